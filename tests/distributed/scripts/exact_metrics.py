"""Train a small model, then evaluate it on 1001 samples; write what every rank ends with.

    python exact_metrics.py --out DIR --engine single --batch-size 64
    python exact_metrics.py --out DIR --engine ddp --world-size 3 --batch-size 32   (spawn mode)
    ddprun --nproc 2 exact_metrics.py --out DIR --engine ddp --batch-size 32        (launched)

Training uses an unshuffled loader, so one process with batch 64 and two with batch 32 see the
same samples per step and must reach the same weights; validation (1001 samples, uneven across
ranks) must give the same metrics.
"""

import argparse
import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from ddprun import dl

NUM_CLASSES = 5


def datasets():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2025, 8, generator=generator)
    y = (x[:, :4].argmax(dim=1)).long()  # class 4 never occurs: an empty class
    return TensorDataset(x[:1024], y[:1024]), TensorDataset(x[1024:], y[1024:])


class Dump(dl.Callback):
    """Rank 0 writes the epoch metrics and the confusion matrix; every rank its weights."""

    def __init__(self, out: Path, confusion: dl.ConfusionMatrixCallback):
        super().__init__(order=dl.CallbackOrder.ExternalExtra)
        self.out, self.confusion = out, confusion

    def on_experiment_end(self, runner):
        rank = max(runner.engine.rank, 0)
        weights = {
            k: v.tolist() for k, v in runner.engine.unwrap(runner.model).state_dict().items()
        }
        (self.out / f"weights_rank{rank}.json").write_text(json.dumps(weights))
        if runner.engine.is_master:
            result = {
                "epoch_metrics": runner.epoch_metrics,
                "matrix": self.confusion.matrix.tolist(),
                "world_size": runner.engine.world_size,
                "global_sample_step": runner.global_sample_step,
            }
            (self.out / "metrics.json").write_text(json.dumps(result))


class ExactRunner(dl.Runner):
    def handle_batch(self, batch):
        x, y = batch
        logits = self.model(x)
        self.batch = {"features": x, "targets": y, "logits": logits}
        # a user-logged value: must be averaged exactly over all samples of all ranks
        self.batch_metrics["logit_mean"] = logits.detach().mean()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--engine", choices=["single", "ddp"], default="single")
    parser.add_argument("--world-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--no-train", action="store_true", help="only evaluate the initial model")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, NUM_CLASSES)
    )
    train, valid = datasets()
    engine = (
        dl.DeviceEngine("cpu")
        if args.engine == "single"
        else dl.DistributedDataParallelEngine(world_size=args.world_size)
    )
    loaders = {"valid": DataLoader(valid, batch_size=50)}
    if not args.no_train:
        loaders = {"train": DataLoader(train, batch_size=args.batch_size), **loaders}
    confusion = dl.ConfusionMatrixCallback("logits", "targets", num_classes=NUM_CLASSES)
    ExactRunner().train(
        model=model,
        criterion=torch.nn.CrossEntropyLoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        loaders=loaders,
        engine=engine,
        callbacks=[
            dl.CriterionCallback("logits", "targets"),
            dl.OptimizerCallback(),
            dl.AccuracyCallback("logits", "targets", topk_args=(1, 3)),
            dl.PrecisionRecallF1SupportCallback("logits", "targets", num_classes=NUM_CLASSES),
            confusion,
            Dump(out, confusion),
        ],
        loggers={},
        num_epochs=2,
    )


if __name__ == "__main__":
    main()
