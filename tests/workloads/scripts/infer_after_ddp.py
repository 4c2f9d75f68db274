"""Inference after a DDP run: predict_loader, evaluate_loader and gathered predictions.

    python infer_after_ddp.py --out DIR                  (spawn mode: the parent infers)
    ddprun --nproc 2 infer_after_ddp.py --out DIR        (launched: every rank infers)

Trains a small model with BatchNorm for one epoch on a DDP engine, then writes, per process
(``tag`` = "parent" or "rank<N>"): the model state it infers with (``weights_<tag>.pt``), the
predictions of predict_loader (``predict_<tag>.pt``), evaluate_loader's metrics
(``evaluate_<tag>.json``), the predictions of predict_loader(gather=True)
(``gathered_<tag>.pt``: a list of {"index", "logits"} batches, written before evaluate_loader
ran) and which engine the runner holds afterwards (``engine_<tag>.json``); launched ranks then
try gather=True on a loader with a batch_sampler and write the error
(``gather_error_<tag>.txt``). The inference dataset has an odd size (37).
"""

import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler, TensorDataset

from ddprun import dl

N_INFER = 37


class Indexed(Dataset):
    """(features, target, index): the index tells where each prediction came from."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i], i


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def infer_data():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(N_INFER, 5, generator=generator)
    return x, x[:, :3].argmax(dim=1)


class InferRunner(dl.Runner):
    def handle_batch(self, batch):
        x, y = batch[0], batch[1]
        self.batch = {"logits": self.model(x), "targets": y}
        self.batch_metrics["ce"] = F.cross_entropy(self.batch["logits"], y)

    def predict_batch(self, batch):
        assert batch[0].device == self.device  # moved by predict_loader
        return {"index": batch[2], "logits": self.model(batch[0])}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=generator)
    train = DataLoader(TensorDataset(x, x[:, :3].argmax(dim=1)), batch_size=8)
    runner = InferRunner()
    model = make_model()
    runner.train(
        model=model,
        criterion=nn.CrossEntropyLoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        loaders={"train": train},
        engine=dl.DistributedDataParallelEngine(world_size=2),
        callbacks=[
            dl.CriterionCallback(input_key="logits", target_key="targets", metric_key="loss"),
            dl.OptimizerCallback(metric_key="loss"),
        ],
        loggers={},
    )
    tag = f"rank{os.environ['RANK']}" if "RANK" in os.environ else "parent"
    loader = DataLoader(Indexed(*infer_data()), batch_size=4)
    plain = runner.engine.unwrap(runner.model)
    torch.save({k: v.clone() for k, v in plain.state_dict().items()}, out / f"weights_{tag}.pt")
    predictions = list(runner.predict_loader(loader=loader))
    torch.save(predictions, out / f"predict_{tag}.pt")
    # before evaluate_loader, whose DDP wrapping hands every rank rank 0's BatchNorm statistics
    gathered = list(runner.predict_loader(loader=loader, gather=True))
    torch.save(gathered, out / f"gathered_{tag}.pt")
    metrics = runner.evaluate_loader(
        loader,
        callbacks=[dl.CriterionCallback(input_key="logits", target_key="targets")],
    )
    (out / f"evaluate_{tag}.json").write_text(json.dumps(metrics))
    engine = runner.engine
    info = {"type": type(engine).__name__, "is_master": engine.is_master, "rank": engine.rank}
    (out / f"engine_{tag}.json").write_text(json.dumps(info))
    if "RANK" in os.environ:  # a loader that cannot be split into blocks: a clear error
        batches = BatchSampler(SequentialSampler(range(N_INFER)), batch_size=4, drop_last=False)
        custom = DataLoader(Indexed(*infer_data()), batch_sampler=batches)
        try:
            list(runner.predict_loader(loader=custom, gather=True))
        except dl.RunnerError as error:
            (out / f"gather_error_{tag}.txt").write_text(str(error))


if __name__ == "__main__":
    main()
