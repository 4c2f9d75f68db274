"""Loaders the DDP engine must shard without changing what they mean; every rank records the
sample ids of every batch it ran.

    python sharded_loaders.py --out DIR --case iterable --batch-size 16            (one process)
    ddprun --nproc 2 sharded_loaders.py --out DIR --case iterable --engine ddp --workers 2
    python sharded_loaders.py --out DIR --case tail --engine ddp --world-size 2   (spawn mode)

Cases:
  iterable  train: a sized IterableDataset of 64; valid: an unsized one of 37; valid_self: a
            dataset that shards itself (``shards_by_rank = True``). Two epochs.
  tail      train: an unsized IterableDataset of 37 (batch 4: the last round is partial, padded);
            train_drop: the same with drop_last=True (dropped). Two epochs.
  samplers  lr 0 (metrics depend only on the data): train_random (RandomSampler with
            replacement, num_samples=200 over 20 items), train_weighted (WeightedRandomSampler,
            60 draws, ids >= 10 weigh 0), train_bucket / valid_bucket (a length-bucketing
            batch_sampler; 9 batches for training, 10 for evaluation), valid (plain). Two epochs.

Each rank writes ``rank<r>.json`` (its batches' ids per ``epoch/loader``, the loaders' dataset
types, the epochs its bucketing samplers were drawn for); rank 0 writes ``metrics.json``.
"""

import argparse
import json
from pathlib import Path

import torch
from torch.utils.data import (
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    Sampler,
    WeightedRandomSampler,
)

from ddprun import dl
from ddprun.data import stream_shard


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=generator)
    return x, x[:, :3].argmax(dim=1)


class Stream(IterableDataset):
    """Yields ``(id, x, y)`` for ids 0..n-1 in order; no length."""

    def __init__(self, n: int, seed: int = 0):
        self.n = n
        self.x, self.y = _data(n, seed)

    def _ids(self):
        return range(self.n)

    def __iter__(self):
        for i in self._ids():
            yield i, self.x[i], self.y[i]


class SizedStream(Stream):
    def __len__(self):
        return self.n


class SelfSharded(Stream):
    """Reads only its own share of ranks x workers: ddprun must leave it alone."""

    shards_by_rank = True

    def _ids(self):
        shard, shards = stream_shard()
        return range(shard, self.n, shards)


class Table(Dataset):
    def __init__(self, n: int, seed: int = 1):
        self.n = n
        self.x, self.y = _data(n, seed)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i, self.x[i], self.y[i]


class Buckets(Sampler):
    """Length bucketing: ids grouped by ``id % 3`` (the "length"), batches of up to 4 within a
    bucket, batch order shuffled by its own generator seeded with the epoch (``set_epoch``)."""

    def __init__(self, n: int):
        self.n, self.epoch, self.drawn_for = n, 0, []

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def _batches(self):
        batches = []
        for bucket in range(3):
            ids = list(range(bucket, self.n, 3))
            batches += [ids[i : i + 4] for i in range(0, len(ids), 4)]
        return batches

    def __iter__(self):
        self.drawn_for.append(self.epoch)
        batches = self._batches()
        order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(self.epoch))
        return iter([batches[i] for i in order.tolist()])

    def __len__(self):
        return len(self._batches())


class RecordingRunner(dl.Runner):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: dict[str, list[list[int]]] = {}

    def handle_batch(self, batch):
        ids, x, y = batch
        key = f"{self.global_epoch_step}/{self.loader_key}"
        self.seen.setdefault(key, []).append(ids.tolist())
        self.batch = {"features": x, "targets": y, "logits": self.model(x)}


class Dump(dl.Callback):
    def __init__(self, out: Path, buckets: dict):
        super().__init__(order=dl.CallbackOrder.ExternalExtra)
        self.out, self.buckets = out, buckets

    def on_experiment_end(self, runner):
        rank = max(runner.engine.rank, 0)
        record = {
            "batches": runner.seen,
            "types": {k: type(v.dataset).__name__ for k, v in runner.loaders.items()},
            "bucket_epochs": {k: v.drawn_for for k, v in self.buckets.items()},
        }
        (self.out / f"rank{rank}.json").write_text(json.dumps(record))
        if runner.engine.is_master:
            metrics = {
                "epoch_metrics": runner.epoch_metrics,
                "world_size": runner.engine.world_size,
            }
            (self.out / "metrics.json").write_text(json.dumps(metrics))


def loaders_for(case: str, batch: int, workers: int) -> tuple[dict, dict]:
    kw = {"num_workers": workers}
    if case == "iterable":
        loaders = {
            "train": DataLoader(SizedStream(64), batch_size=batch, **kw),
            "valid": DataLoader(Stream(37, seed=1), batch_size=5, **kw),
            "valid_self": DataLoader(SelfSharded(37, seed=2), batch_size=5, **kw),
        }
        return loaders, {}
    if case == "tail":
        loaders = {
            "train": DataLoader(Stream(37), batch_size=4, **kw),
            "train_drop": DataLoader(Stream(37), batch_size=4, drop_last=True, **kw),
        }
        return loaders, {}
    table, small = Table(37), Table(20, seed=2)
    weights = torch.tensor([1.0] * 10 + [0.0] * 10)
    buckets = {"train_bucket": Buckets(33), "valid_bucket": Buckets(37)}
    loaders = {
        "train_random": DataLoader(
            small, batch_size=2, sampler=RandomSampler(small, replacement=True, num_samples=200)
        ),
        "train_weighted": DataLoader(
            small, batch_size=3, sampler=WeightedRandomSampler(weights, num_samples=60)
        ),
        "train_bucket": DataLoader(table, batch_sampler=buckets["train_bucket"]),
        "valid_bucket": DataLoader(table, batch_sampler=buckets["valid_bucket"]),
        "valid": DataLoader(table, batch_size=5),
    }
    return loaders, buckets


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--case", choices=["iterable", "tail", "samplers"], required=True)
    parser.add_argument("--engine", choices=["single", "ddp"], default="single")
    parser.add_argument("--world-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 3)
    engine = (
        dl.DeviceEngine("cpu")
        if args.engine == "single"
        else dl.DistributedDataParallelEngine(world_size=args.world_size)
    )
    loaders, buckets = loaders_for(args.case, args.batch_size, args.workers)
    lr = 0.0 if args.case == "samplers" else 0.5
    RecordingRunner().train(
        model=model,
        criterion=torch.nn.CrossEntropyLoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=lr),
        loaders=loaders,
        engine=engine,
        callbacks=[
            dl.CriterionCallback("logits", "targets"),
            dl.OptimizerCallback(),
            dl.AccuracyCallback("logits", "targets", topk_args=(1,)),
            Dump(out, buckets),
        ],
        loggers={},
        num_epochs=2,
    )


if __name__ == "__main__":
    main()
