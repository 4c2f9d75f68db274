"""Catalyst 21.12's experiment loggers with only the imports renamed: a SupervisedRunner logs
to MLflow or W&B (offline), with hyper-parameters and images.

    python tracking_loggers.py --logger mlflow --uri sqlite:///DIR/db.sqlite --out DIR
    ddprun --nproc 2 tracking_loggers.py --logger wandb --out DIR --batch-size 16

Training is unshuffled, so 2 ranks x 16 see the same samples per step as 1 x 32. The logger is
built on every rank (the script runs on each); only rank 0 may start a run. Rank 0 writes the
epoch metrics and sample counters it saw; every rank writes which loggers its runner held.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ddprun import dl


def loaders(batch_size: int):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(320, 10, generator=generator)
    y = (x[:, :5].argmax(dim=1)).long()
    train, valid = TensorDataset(x[:256], y[:256]), TensorDataset(x[256:], y[256:])
    return {
        "train": DataLoader(train, batch_size=batch_size),
        "valid": DataLoader(valid, batch_size=batch_size),
    }


class Images(dl.Callback):
    """Logs a numpy HxWxC image after "valid" and a CxHxW tensor image after "train"."""

    def __init__(self):
        super().__init__(order=dl.CallbackOrder.External)

    def on_loader_end(self, runner):
        if runner.is_train_loader:
            runner.log_image("chw", torch.full((3, 8, 6), 0.5))
        else:
            runner.log_image("sample", np.full((8, 6, 3), 200, dtype=np.uint8))


class Record(dl.Callback):
    def __init__(self):
        super().__init__(order=dl.CallbackOrder.ExternalExtra)
        self.epochs, self.loggers = [], None

    def on_epoch_end(self, runner):
        self.loggers = sorted(runner.loggers)
        self.epochs.append(
            {
                "metrics": {k: dict(v) for k, v in runner.epoch_metrics.items()},
                "global_epoch_step": runner.global_epoch_step,
                "global_sample_step": runner.global_sample_step,
            }
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--logger", choices=["mlflow", "wandb"], required=True)
    parser.add_argument("--uri", default=None)
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if args.logger == "mlflow":
        logger = dl.MLflowLogger(
            experiment="ddprun-compat", run="tiny", tracking_uri=args.uri, exclude=["secret"]
        )
    else:
        logger = dl.WandbLogger(project="ddprun-compat", name="tiny", dir=str(out))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 5))
    record = Record()
    runner = dl.SupervisedRunner()
    runner.train(
        model=model,
        criterion=nn.CrossEntropyLoss(),
        optimizer=torch.optim.Adam(model.parameters(), lr=0.02),
        loaders=loaders(args.batch_size),
        num_epochs=2,
        callbacks=[Images(), record],
        loggers={"tracker": logger},
        hparams={"lr": 0.02, "model": {"hidden": 16}, "secret": "not logged"},
    )
    rank = max(runner.engine.rank, 0)
    (out / f"rank{rank}.json").write_text(json.dumps({"loggers": record.loggers}))
    if runner.engine.is_master:
        (out / "result.json").write_text(json.dumps({"epochs": record.epochs}))


if __name__ == "__main__":
    main()
