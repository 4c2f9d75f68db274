"""The control callbacks in one process or under ``python -m ddprun --nproc 2``; writes results.

    python control_callbacks.py --out DIR --batch-size 16
    python -m ddprun --nproc 2 control_callbacks.py --out DIR --batch-size 8

Runs five trainings in a row (each its own ``train``): two criteria aggregated into ``loss``
(trained on unshuffled data, so 2 ranks x batch b == 1 process x batch 2b), a ControlFlow-
wrapped AccuracyCallback, PeriodicLoaderCallback with a CheckpointCallback, CheckRunCallback
and BatchOverfitCallback. Rank 0 writes ``result.json`` (epoch metrics and weights); every
rank writes ``batches_rank<r>.json`` (the sample ids of each loader pass).
"""

import argparse
import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from ddprun import dl

FEATURES, CLASSES = 6, 3


def dataset(n: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=generator)
    return TensorDataset(x, x[:, :CLASSES].argmax(dim=1), torch.arange(n))


class TwoHeadRunner(dl.Runner):
    def handle_batch(self, batch):
        x, y, ids = batch
        logits = self.model(x)
        onehot = torch.nn.functional.one_hot(y, CLASSES).float()
        self.batch = {"logits": logits, "targets": y, "onehot": onehot, "ids": ids}


class Passes(dl.Callback):
    """Every rank: the sample ids each loader pass saw, per stage epoch."""

    def __init__(self, out: Path, case: str, record: dict):
        super().__init__(order=dl.CallbackOrder.ExternalExtra)
        self.out, self.case, self.record = out, case, record

    def on_loader_start(self, runner):
        self.ids = []

    def on_batch_end(self, runner):
        self.ids.extend(runner.batch["ids"].tolist())

    def on_loader_end(self, runner):
        key = f"{runner.stage_epoch_step}/{runner.loader_key}"
        self.record.setdefault(self.case, {})[key] = self.ids


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def train(case, callbacks, loaders, record, out, num_epochs=2, **kwargs):
    net = model()
    runner = TwoHeadRunner()
    runner.train(
        model=net,
        criterion={"ce": torch.nn.CrossEntropyLoss(), "bce": torch.nn.BCEWithLogitsLoss()},
        optimizer=torch.optim.SGD(net.parameters(), lr=0.5),
        loaders=loaders,
        callbacks=[*callbacks, Passes(out, case, record)],
        loggers={},
        num_epochs=num_epochs,
        **kwargs,
    )
    weights = {k: v.tolist() for k, v in runner.engine.unwrap(runner.model).state_dict().items()}
    return runner, {"epoch_metrics": runner.epoch_metrics, "weights": weights}


def losses(aggregate: bool = True) -> list:
    callbacks = [
        dl.CriterionCallback("logits", "targets", "loss_ce", criterion_key="ce"),
        dl.CriterionCallback("logits", "onehot", "loss_bce", criterion_key="bce"),
    ]
    if aggregate:
        weights = {"loss_ce": 0.7, "loss_bce": 0.3}
        callbacks.append(dl.MetricAggregationCallback("loss", weights, mode="weighted_sum"))
    return [*callbacks, dl.OptimizerCallback(metric_key="loss")]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    b = args.batch_size
    train_set, valid_set = dataset(64, 1), dataset(50, 2)

    def loaders(shuffle=False):
        return {
            "train": DataLoader(train_set, batch_size=b, shuffle=shuffle),
            "valid": DataLoader(valid_set, batch_size=10),
        }

    record, result = {}, {}
    score = dl.MetricAggregationCallback(
        "score", {"accuracy01": 1.0, "loss_ce": -0.5}, mode="weighted_sum", scope="loader"
    )
    accuracy = dl.AccuracyCallback("logits", "targets", topk_args=(1, 2))
    runner, result["aggregate"] = train(
        "aggregate", [*losses(), accuracy, score], loaders(), record, out
    )
    wrapped = [
        dl.ControlFlowCallback(dl.AccuracyCallback("logits", "targets"), loaders="valid"),
        dl.ControlFlowCallback(
            dl.AccuracyCallback("logits", "targets", topk_args=(2,)),
            filter_fn="lambda stage, epoch, loader: epoch == 2",
        ),
    ]
    runner, result["control_flow"] = train(
        "control_flow", losses() + wrapped, loaders(), record, out
    )
    periodic = dl.PeriodicLoaderCallback("valid", "loss", minimize=True, valid=2)
    runner, result["periodic"] = train(
        "periodic", [*losses(), periodic], loaders(), record, out, num_epochs=3, logdir=out / "logs"
    )
    runner, result["check_run"] = train(
        "check_run", [*losses(), dl.CheckRunCallback(2, 2)], loaders(), record, out, num_epochs=4
    )
    overfit = dl.BatchOverfitCallback(train=2, valid=0.5)
    runner, result["overfit"] = train(
        "overfit", [*losses(), overfit], loaders(shuffle=True), record, out, num_epochs=3
    )
    rank = max(runner.engine.rank, 0)
    (out / f"batches_rank{rank}.json").write_text(json.dumps(record))
    if rank == 0:
        result["world_size"] = runner.engine.world_size
        (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
