"""Train a one-logit model with BCEWithLogitsLoss; write the metrics and the final predictions.

    python binary_outputs.py --out DIR --shape column --batch-size 64           (one process)
    ddprun --nproc 2 binary_outputs.py --out DIR --shape column --engine ddp --batch-size 32

--shape column: logits (B, 1) with float targets (B, 1), as BCEWithLogitsLoss takes them.
--shape flat: logits (B,) with int64 targets (B,) for the metrics (the loss gets a float copy).

Training is unshuffled, so one process with batch 64 and two with batch 32 take the same steps.
Rank 0 writes metrics.json: the epoch metrics, the confusion matrix, and the final model's
validation logits and targets (for scikit-learn in the test).
"""

import argparse
import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from ddprun import dl


def datasets():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2025, 8, generator=generator)
    direction = torch.randn(8, generator=generator)
    noise = torch.randn(2025, generator=generator)
    y = (x @ direction + 0.7 * noise > 0.3).long()  # noisy, so accuracy stays below 1
    return TensorDataset(x[:1024], y[:1024]), TensorDataset(x[1024:], y[1024:])


class Dump(dl.Callback):
    def __init__(self, out: Path, confusion: dl.ConfusionMatrixCallback, valid: TensorDataset):
        super().__init__(order=dl.CallbackOrder.ExternalExtra)
        self.out, self.confusion, self.valid = out, confusion, valid

    def on_experiment_end(self, runner):
        if not runner.engine.is_master:
            return
        model = runner.engine.unwrap(runner.model)
        x, y = self.valid.tensors
        with torch.no_grad():
            logits = model(x).reshape(-1)
        result = {
            "epoch_metrics": runner.epoch_metrics,
            "matrix": self.confusion.matrix.tolist(),
            "world_size": runner.engine.world_size,
            "valid_logits": logits.tolist(),
            "valid_targets": y.tolist(),
        }
        (self.out / "metrics.json").write_text(json.dumps(result))


class BinaryRunner(dl.Runner):
    def __init__(self, shape: str):
        super().__init__()
        self.shape = shape

    def handle_batch(self, batch):
        x, y = batch
        logits = self.model(x)  # (B, 1)
        if self.shape == "column":
            targets = y.float().unsqueeze(1)
            self.batch = {"logits": logits, "targets": targets, "loss_targets": targets}
        else:
            logits = logits.squeeze(1)
            self.batch = {"logits": logits, "targets": y, "loss_targets": y.float()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--shape", choices=["column", "flat"], default="column")
    parser.add_argument("--engine", choices=["single", "ddp"], default="single")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    train, valid = datasets()
    engine = (
        dl.DeviceEngine("cpu") if args.engine == "single" else dl.DistributedDataParallelEngine()
    )
    confusion = dl.ConfusionMatrixCallback("logits", "targets", num_classes=2)
    BinaryRunner(args.shape).train(
        model=model,
        criterion=torch.nn.BCEWithLogitsLoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        loaders={
            "train": DataLoader(train, batch_size=args.batch_size),
            "valid": DataLoader(valid, batch_size=50),
        },
        engine=engine,
        callbacks=[
            dl.CriterionCallback("logits", "loss_targets"),
            dl.OptimizerCallback(),
            dl.AccuracyCallback("logits", "targets"),
            dl.PrecisionRecallF1SupportCallback("logits", "targets", num_classes=2),
            confusion,
            Dump(out, confusion, valid),
        ],
        loggers={},
        num_epochs=2,
    )


if __name__ == "__main__":
    main()
