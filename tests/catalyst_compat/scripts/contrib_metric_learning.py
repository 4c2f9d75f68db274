"""Catalyst 21.12's README metric-learning example, imports renamed, on synthetic MNIST files:
MnistMLDataset batched by BatchBalanceClassSampler (as the loader's batch_sampler), MnistSimpleNet,
TripletMarginLossWithSampler with HardTripletsSampler; MnistQGDataset evaluated.

    ddprun --nproc 2 contrib_metric_learning.py --root DIR --out DIR

Each rank writes ``rank<r>.json``: the dataset indices of every train batch it ran and that
batch's loss (per epoch), and its valid embeddings in loader order. Rank 0 writes the trained
weights to ``weights.pt``. The test replays the same batches in one process and compares.
"""

import argparse
import json
import os
from pathlib import Path

import torch
from torch.optim import SGD
from torch.utils.data import DataLoader

from ddprun import dl
from ddprun.contrib import data, datasets, models, nn
from ddprun.data import BatchBalanceClassSampler


class IndexedMnistML(datasets.MnistMLDataset):
    """MnistMLDataset items plus their index, so each rank can say what it trained on."""

    def __getitem__(self, index):
        image, label = super().__getitem__(index)
        return image, label, index


class MetricRunner(dl.Runner):
    def on_experiment_start(self, runner):
        super().on_experiment_start(runner)
        self.record = {"batches": {}, "losses": {}, "valid": {}}

    def handle_batch(self, batch):
        epoch = str(self.global_epoch_step)
        if self.is_train_loader:
            images, targets, ids = batch
            embeddings = self.model(images)
            loss = self.criterion(embeddings, targets)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad()
            self.batch_metrics["loss"] = loss
            self.record["batches"].setdefault(epoch, []).append(ids.tolist())
            self.record["losses"].setdefault(epoch, []).append(loss.detach())
            self.batch = {"embeddings": embeddings, "targets": targets}
        else:
            embeddings = self.model(batch["features"])
            valid = self.record["valid"].setdefault(epoch, {"embeddings": [], "is_query": []})
            valid["embeddings"].append(embeddings.detach())
            valid["is_query"].append(batch["is_query"])
            self.batch = {"embeddings": embeddings, "targets": batch["targets"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    train_dataset = IndexedMnistML(root=args.root)
    sampler = BatchBalanceClassSampler(
        labels=train_dataset.get_labels(), num_classes=3, num_samples=4, num_batches=6
    )
    valid_dataset = datasets.MnistQGDataset(root=args.root, gallery_fraq=0.5)
    loaders = {
        "train": DataLoader(dataset=train_dataset, batch_sampler=sampler),
        "valid": DataLoader(dataset=valid_dataset, batch_size=16),
    }

    torch.manual_seed(0)
    model = models.MnistSimpleNet(out_features=8)
    criterion = nn.TripletMarginLossWithSampler(
        margin=0.5, sampler_inbatch=data.HardTripletsSampler(norm_required=False)
    )
    runner = MetricRunner()
    runner.train(
        model=model,
        criterion=criterion,
        optimizer=SGD(model.parameters(), lr=0.05),
        loaders=loaders,
        num_epochs=args.epochs,
        seed=args.seed,
        loggers={},
        valid_loader="train",
        valid_metric="loss",
    )

    rank = max(runner.engine.rank, 0)
    record = runner.record
    result = {
        "world_size": runner.engine.world_size,
        "engine": type(runner.engine).__name__,
        "batch_sampler": type(runner.loaders["train"].batch_sampler).__name__,
        "batches": record["batches"],
        "losses": {e: torch.stack(v).tolist() for e, v in record["losses"].items()},
        "valid": {
            e: {
                "embeddings": torch.cat(v["embeddings"]).tolist(),
                "is_query": torch.cat(v["is_query"]).tolist(),
            }
            for e, v in record["valid"].items()
        },
        "train_loss": runner.epoch_metrics["train"]["loss"],
        "pid": os.getpid(),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    if runner.engine.is_master:
        torch.save(model.state_dict(), out / "weights.pt")


if __name__ == "__main__":
    main()
