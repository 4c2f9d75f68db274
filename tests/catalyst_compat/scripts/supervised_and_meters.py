"""Catalyst 21.12's README patterns with only the imports renamed: a SupervisedRunner, and a
custom Runner that keeps meters in its own on_loader_start/on_loader_end (the docs' pattern).

    python supervised_and_meters.py --out DIR --batch-size 32
    ddprun --nproc 2 supervised_and_meters.py --out DIR --batch-size 16

Training is unshuffled, so 2 ranks x 16 see the same samples per step as 1 x 32. Rank 0 writes
the epoch metrics of both runs and the predictions of the supervised one.
"""

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ddprun import dl, metrics


def loaders(batch_size: int):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(320, 10, generator=generator)
    y = (x[:, :5].argmax(dim=1)).long()
    train, valid = TensorDataset(x[:256], y[:256]), TensorDataset(x[256:], y[256:])
    return {
        "train": DataLoader(train, batch_size=batch_size),
        "valid": DataLoader(valid, batch_size=batch_size),
    }


class CustomRunner(dl.Runner):
    def on_loader_start(self, runner):
        super().on_loader_start(runner)
        self.meters = {
            key: metrics.AdditiveValueMetric(compute_on_call=False)
            for key in ["loss", "accuracy01", "accuracy03"]
        }

    def handle_batch(self, batch):
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        accuracy01, accuracy03 = metrics.accuracy(logits, y, topk=(1, 3))
        self.batch_metrics.update(
            {"loss": loss, "accuracy01": accuracy01, "accuracy03": accuracy03}
        )
        for key in ["loss", "accuracy01", "accuracy03"]:
            self.meters[key].update(self.batch_metrics[key].item(), self.batch_size)
        if self.is_train_loader:
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad()

    def on_loader_end(self, runner):
        for key in ["loss", "accuracy01", "accuracy03"]:
            self.loader_metrics[f"meter/{key}"] = self.meters[key].compute()[0]
        super().on_loader_end(runner)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 5))
    runner = dl.SupervisedRunner(
        input_key="features", output_key="logits", target_key="targets", loss_key="loss"
    )
    runner.train(
        model=model,
        criterion=nn.CrossEntropyLoss(),
        optimizer=torch.optim.Adam(model.parameters(), lr=0.02),
        loaders=loaders(args.batch_size),
        num_epochs=2,
        callbacks=[
            dl.AccuracyCallback(input_key="logits", target_key="targets", topk_args=(1, 3)),
            dl.PrecisionRecallF1SupportCallback(
                input_key="logits", target_key="targets", num_classes=5
            ),
        ],
        logdir=str(out / "logs"),
        valid_loader="valid",
        valid_metric="loss",
        minimize_valid_metric=True,
        load_best_on_end=True,
    )
    trained = {k: dict(v) for k, v in runner.epoch_metrics.items()}
    predictions = [p["logits"] for p in runner.predict_loader(loader=loaders(64)["valid"])]
    evaluated = runner.evaluate_loader(
        loader=loaders(64)["valid"],
        callbacks=[dl.AccuracyCallback(input_key="logits", target_key="targets")],
    )

    torch.manual_seed(0)
    custom_model = nn.Linear(10, 5)
    custom = CustomRunner()
    custom.train(
        model=custom_model,
        optimizer=torch.optim.Adam(custom_model.parameters(), lr=0.02),
        loaders=loaders(args.batch_size),
        num_epochs=2,
        loggers={},
    )
    if runner.engine.is_master:
        result = {
            "supervised": trained,
            "custom": custom.epoch_metrics,
            "evaluated": evaluated,
            "predictions": torch.cat(predictions).tolist(),
            "engine": type(runner.engine).__name__,
        }
        (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
