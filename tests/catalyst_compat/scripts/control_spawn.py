"""Spawn mode (plain ``python``, a DDP engine with 2 workers) with lambdas in the callbacks:
a ControlFlowCallback filter_fn, a BatchTransformCallback transform and a
MetricAggregationCallback mode, which Catalyst 21.12 could not send to its workers (#1317).

    python control_spawn.py --out DIR
"""

import argparse
import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from ddprun import dl

OFFSET = 0.0  # a module global the lambdas read in the workers


class SpawnRunner(dl.Runner):
    def handle_batch(self, batch):
        x, y = batch
        self.batch = {"logits": self.model(x), "targets": y}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    out = Path(parser.parse_args().out)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 4, generator=generator)
    data = TensorDataset(x, x[:, :3].argmax(dim=1))
    scale = 1.0  # a closure value
    model = torch.nn.Linear(4, 3)
    runner = SpawnRunner()
    runner.train(
        model=model,
        criterion=torch.nn.CrossEntropyLoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loaders={"train": DataLoader(data, batch_size=10), "valid": DataLoader(data, 10)},
        engine=dl.DistributedDataParallelEngine(world_size=2),
        callbacks=[
            dl.BatchTransformCallback(
                lambda logits: logits * scale + OFFSET, "on_batch_end", "logits", "scores"
            ),
            dl.CriterionCallback("scores", "targets", "ce"),
            dl.MetricAggregationCallback("loss", mode=lambda metrics, runner: metrics["ce"] * 2),
            dl.OptimizerCallback("loss"),
            dl.ControlFlowCallback(
                dl.AccuracyCallback("scores", "targets"),
                filter_fn=lambda stage, epoch, loader: loader == "valid" and epoch == 2,
            ),
        ],
        loggers={},
        num_epochs=2,
    )
    metrics = runner.epoch_metrics
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps({k: dict(v) for k, v in metrics.items()}))


if __name__ == "__main__":
    main()
