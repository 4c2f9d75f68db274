"""Every Catalyst-style metric callback (and torchmetrics through ddprun's sync) on evaluation
loaders split unevenly across ranks; rank 0 writes the epoch metrics and the loader-end
collectives every rank issued.

    python metric_callbacks.py --out DIR --sets every                          (one process)
    python metric_callbacks.py --out DIR --engine ddp --world-size 3 --sets every   (spawn)
    ddprun --nproc 2 metric_callbacks.py --out DIR --engine ddp --sets sums,all     (launched)

``--sets sums,all,every`` runs one experiment per set (into DIR/<set>): "sums" keeps metrics
whose states are sums (the loader end must issue one all-reduce and nothing else), "all" adds
the ones that gather scores ("cat" states: one all-gather more), "every" adds a torchmetrics
metric with a state of every reduction (its max/min states: one max all-reduce more).
Loaders: "valid" (1001 samples), "valid_small" (7) and "valid_tiny" (2 samples: on 3 ranks one
rank has no batch at all).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torchmetrics
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import (
    BinaryAUROC,
    MulticlassAccuracy,
    MulticlassRecall,
    MultilabelAveragePrecision,
)

from ddprun import dl
from ddprun.metrics import TorchMetric
from ddprun.metrics.sync import CountingCollectives

CLASSES, LABELS, SEG_CLASSES, IDENTITIES = 6, 4, 3, 20
REPORTS: list = []  # this process's loader-end collective reports


def make_data(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic inputs of every metric; scores rounded so that ties occur."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    logits = torch.randn(n, CLASSES, generator=g) + 1.5 * torch.eye(CLASSES)[labels]
    ml_targets = (torch.rand(n, LABELS, generator=g) < 0.4).long()
    ml_scores = (0.5 * ml_targets + torch.rand(n, LABELS, generator=g)).round(decimals=2) / 1.5
    binary_targets = (torch.rand(n, generator=g) < 0.3).long()
    binary_scores = (binary_targets + 1.2 * torch.randn(n, generator=g)).round(decimals=1)
    masks = (torch.rand(n, SEG_CLASSES, 4, 4, generator=g) < 0.35).float()
    soft = (0.45 * masks + 0.55 * torch.rand(n, SEG_CLASSES, 4, 4, generator=g)).clamp(0, 1)
    identities = torch.randint(0, IDENTITIES, (n,), generator=g)
    centers = torch.randn(IDENTITIES, 8, generator=g)
    embeddings = centers[identities] + 0.9 * torch.randn(n, 8, generator=g)
    is_query = torch.arange(n) % 4 == 0
    return {
        "logits": logits,
        "tied_logits": logits.round(decimals=1),  # AUC must score ties order-free
        "targets": labels,
        "ml_scores": ml_scores,
        "ml_targets": ml_targets,
        "binary_scores": binary_scores,
        "binary_probs": binary_scores.sigmoid(),  # torchmetrics squashes logits per batch
        "binary_targets": binary_targets,
        "masks": masks,
        "soft": soft,
        "embeddings": embeddings,
        "identities": identities,
        "is_query": is_query,
    }


KEYS = list(make_data(1))
SIZES = {"valid": (1001, 32), "valid_small": (7, 2), "valid_tiny": (2, 1)}


def make_loaders() -> dict[str, DataLoader]:
    loaders = {}
    for index, (name, (n, batch)) in enumerate(SIZES.items()):
        data = make_data(n, seed=index)
        loaders[name] = DataLoader(TensorDataset(*(data[k] for k in KEYS)), batch_size=batch)
    return loaders


def make_callbacks(which: str) -> dict[str, dl.Callback]:
    callbacks = {
        "accuracy": dl.AccuracyCallback("logits", "targets", num_classes=CLASSES),
        "accuracy_affixed": dl.AccuracyCallback(
            "logits", "targets", topk_args=(2,), prefix="top_", suffix="_b", log_on_batch=False
        ),
        "ml_accuracy": dl.MultilabelAccuracyCallback("ml_scores", "ml_targets", threshold=0.5),
        "dice": dl.DiceCallback(
            "soft",
            "masks",
            threshold=0.5,
            class_names=["sky", "road", "car"],
            weights=[0.2, 0.3, 0.5],
            compute_per_class_metrics=True,
        ),
        "tm_accuracy": dl.TorchMetricsCallback(
            MulticlassAccuracy(num_classes=CLASSES, average="micro", validate_args=False),
            "logits",
            "targets",
            log_on_batch=True,
        ),
    }
    if which in ("all", "every"):
        callbacks.update(
            {
                "auc": dl.AUCCallback("tied_logits", "targets", compute_per_class_metrics=True),
                "ml_auc": dl.AUCCallback("ml_scores", "ml_targets", prefix="ml_"),
                "binary_auc": dl.AUCCallback("binary_scores", "binary_targets", suffix="_bin"),
                "iou": dl.IOUCallback(
                    "soft", "masks", threshold=0.5, compute_per_class_metrics=True
                ),
                "soft_trevsky": dl.TrevskyCallback("soft", "masks", alpha=0.3),
                "cmc": dl.CMCScoreCallback(
                    "embeddings", "identities", "is_query", topk_args=(1, 5)
                ),
                "tm_auroc": dl.TorchMetricsCallback(
                    BinaryAUROC(validate_args=False), "binary_probs", "binary_targets"
                ),
                "tm_map": dl.TorchMetricsCallback(
                    MultilabelAveragePrecision(num_labels=LABELS, thresholds=None),
                    "ml_scores",
                    {"ml_targets": "target"},
                    metric_key="ml_map",
                ),
            }
        )
    if which == "every":
        callbacks["tm_every"] = dl.TorchMetricsCallback(
            EveryReduction(), "binary_scores", "binary_targets"
        )
    return callbacks


class CountingDDP(dl.DistributedDataParallelEngine):
    """The DDP engine, with every loader-end sync's collectives counted."""

    @property
    def collectives(self):
        inner = super().collectives
        if inner is None:
            return None
        counting = CountingCollectives(inner)
        REPORTS.append(counting.report)
        return counting


def sum_of_stack(stacked: torch.Tensor) -> torch.Tensor:
    """A custom torchmetrics reduction (module level: spawn mode pickles the metric)."""
    return stacked.sum(dim=0)


class EveryReduction(torchmetrics.Metric):
    """A torchmetrics metric with a state of every reduction torchmetrics offers."""

    def __init__(self):
        super().__init__()
        self.add_state("total", torch.tensor(0.0), "sum")
        self.add_state("top", torch.tensor(-float("inf")), "max")
        self.add_state("low", torch.tensor(float("inf")), "min")
        self.add_state("scale", torch.tensor(3.0), "mean")  # the same on every rank
        self.add_state("rows", [], "cat")
        self.add_state("per_update", [], None)
        self.add_state("custom", torch.zeros(2), sum_of_stack)

    def update(self, scores, targets):
        self.total += scores.sum()
        self.top = torch.maximum(self.top, scores.max())
        self.low = torch.minimum(self.low, scores.min())
        self.rows.append(torch.stack([scores, targets.float()], dim=1))
        self.per_update.append(targets.sum())
        self.custom += torch.stack([targets.sum().float(), torch.tensor(float(len(targets)))])

    def compute(self):
        rows = torchmetrics.utilities.dim_zero_cat(self.rows)
        per_update = torchmetrics.utilities.dim_zero_cat(self.per_update)
        return {
            "er_total": self.total,
            "er_top": self.top,
            "er_low": self.low,
            "er_scale": self.scale,
            "er_rows": torch.tensor(float(rows.shape[0])),
            "er_rows_dot": (rows[:, 0] * rows[:, 1]).sum(),
            "er_per_update": per_update.sum().float(),
            "er_custom": self.custom,
        }


class MetricRunner(dl.Runner):
    """Also the runner-held pattern: meters made in on_loader_start (a TorchMetric and a bare
    torchmetrics metric), updated in handle_batch, read in on_loader_end."""

    def on_loader_start(self, runner):
        super().on_loader_start(runner)
        self.wrapped = TorchMetric(MulticlassAccuracy(num_classes=CLASSES, average="macro"))
        self.bare = MulticlassRecall(num_classes=CLASSES, average="weighted")

    def handle_batch(self, batch):
        self.batch = dict(zip(KEYS, batch))
        self.wrapped.update(self.batch["logits"], self.batch["targets"])
        self.bare.update(self.batch["logits"], self.batch["targets"])

    def on_loader_end(self, runner):
        self.loader_metrics["runner_macro_accuracy"] = float(self.wrapped.compute())
        self.loader_metrics["runner_weighted_recall"] = float(self.bare.compute())
        super().on_loader_end(runner)


class Dump(dl.Callback):
    def __init__(self, out: Path):
        super().__init__(order=dl.CallbackOrder.ExternalExtra)
        self.out = out

    def on_experiment_start(self, runner):
        REPORTS.clear()

    def on_experiment_end(self, runner):
        rank = max(runner.engine.rank, 0)
        ops = [report.ops for report in REPORTS if report.ops]
        (self.out / f"ops_rank{rank}.json").write_text(json.dumps(ops))
        if runner.engine.is_master:
            result = {
                "epoch_metrics": runner.epoch_metrics,
                "world_size": runner.engine.world_size,
            }
            (self.out / "metrics.json").write_text(json.dumps(result))


def run(out: Path, which: str = "all", engine=None, num_epochs: int = 2) -> MetricRunner:
    out.mkdir(parents=True, exist_ok=True)
    callbacks = {**make_callbacks(which), "dump": Dump(out)}
    runner = MetricRunner()
    runner.train(
        model=torch.nn.Identity(),
        loaders=make_loaders(),
        engine=engine or dl.DeviceEngine("cpu"),
        callbacks=callbacks,
        loggers={},
        num_epochs=num_epochs,
    )
    return runner


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--engine", choices=["single", "ddp"], default="single")
    parser.add_argument("--world-size", type=int, default=None)
    parser.add_argument("--sets", default="all", help="comma-separated: sums, all, every")
    args = parser.parse_args()
    for which in args.sets.split(","):
        engine = None if args.engine == "single" else CountingDDP(world_size=args.world_size)
        run(Path(args.out) / which, which, engine)


if __name__ == "__main__":
    main()
