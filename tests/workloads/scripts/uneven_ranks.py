"""Ranks with nothing to do, and batch-metric keys only some ranks log.

    python uneven_ranks.py --out DIR                               (one process)
    python uneven_ranks.py --out DIR --ddp --world-size 3          (spawn mode)
    ddprun --nproc 2 uneven_ranks.py --out DIR --ddp               (launched)

Loaders: "train" (64 samples), "valid" (11 samples, batch 1: every batch is one sample in any
world size, so per-batch keys can be compared with one process), "tiny" (1 sample: every rank
but one has no batch). In "valid", `rare` is logged only for the first three samples (rank 0's
block) and `late` only for the last two (the last rank's block). In "train", `rank_only` is
logged by the last rank only. The learning rate is 0, so every world size evaluates the
same weights. Rank 0 writes the epoch metrics; every rank its epoch seeds.
"""

import argparse
import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from ddprun import dl


def data(n: int, offset: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(offset)
    x = torch.randn(n, 6, generator=generator)
    y = (x[:, 0] > 0).long()
    index = torch.arange(n)
    return TensorDataset(x, y, index)


class UnevenRunner(dl.Runner):
    def handle_batch(self, batch):
        x, y, index = batch
        logits = self.model(x)
        self.batch = {"features": x, "targets": y, "logits": logits}
        self.batch_metrics["logit_mean"] = logits.detach().mean()
        if self.loader_key == "valid":
            if int(index[0]) < 3:
                self.batch_metrics["rare"] = logits.detach()[:, 1].mean()
            if int(index[0]) >= 9:
                self.batch_metrics["late"] = float(index[0])
        if self.is_train_loader and self.engine.rank == self.engine.world_size - 1:
            self.batch_metrics["rank_only"] = torch.tensor(5.0)


class Record(dl.Callback):
    def __init__(self, out: Path):
        super().__init__(order=dl.CallbackOrder.ExternalExtra)
        self.out, self.seeds = out, []

    def on_epoch_start(self, runner):
        self.seeds.append(torch.initial_seed())

    def on_experiment_end(self, runner):
        rank = max(runner.engine.rank, 0)
        (self.out / f"seeds_rank{rank}.json").write_text(json.dumps(self.seeds))
        if runner.engine.is_master:
            result = {"epoch_metrics": runner.epoch_metrics, "world": runner.engine.world_size}
            (self.out / "metrics.json").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--ddp", action="store_true")
    parser.add_argument("--world-size", type=int, default=None)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 2)
    loaders = {
        "train": DataLoader(data(64, 1), batch_size=8),
        "valid": DataLoader(data(11, 2), batch_size=1),
        "tiny": DataLoader(data(1, 3), batch_size=4),
    }
    engine = (
        dl.DistributedDataParallelEngine(world_size=args.world_size)
        if args.ddp
        else dl.DeviceEngine("cpu")
    )
    UnevenRunner().train(
        model=model,
        engine=engine,
        criterion=torch.nn.CrossEntropyLoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        loaders=loaders,
        callbacks=[
            dl.CriterionCallback(input_key="logits", target_key="targets", metric_key="loss"),
            dl.OptimizerCallback(metric_key="loss"),
            dl.AccuracyCallback(input_key="logits", target_key="targets"),
            Record(out),
        ],
        loggers={},
        num_epochs=3,
    )


if __name__ == "__main__":
    main()
