"""Mid-epoch position: what a checkpoint needs to continue a loader at its next batch.

`capture` runs on every rank (it gathers each rank's partial metric states and RNG state in one
collective); `restore` puts them back, whatever the new world size: partial metric states are
all "sum"-like, so rank 0 takes the states of every saved rank merged and the other ranks start
empty, which gives the same loader metrics.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from ddprun.checkpoint import restore_rng_state, rng_state
from ddprun.metrics import AdditiveMetric, Metric

_MERGE = {
    "sum": lambda ts: torch.stack(ts).sum(dim=0),
    "max": lambda ts: torch.stack(ts).amax(dim=0),
    "min": lambda ts: torch.stack(ts).amin(dim=0),
    "cat": lambda ts: torch.cat(ts),
}


def _cpu_states(metric: Metric) -> dict[str, torch.Tensor]:
    return {name: t.detach().cpu().clone() for name, t in metric.get_states().items()}


def capture(runner: Any) -> dict[str, Any]:
    """The running loader's position, partial metrics (every rank's) and RNG states."""
    local = {
        "tracked": [_cpu_states(m) for m in runner._tracked_metrics],
        "averages": _averages_with_current_batch(runner),
        "rng": rng_state(),
    }
    batch_size = runner.loader_batch_size or runner.batch_size
    return {
        "global_epoch_step": runner.global_epoch_step,
        "loader_key": runner.loader_key,
        "loader_batch_step": runner.loader_batch_step,
        "loader_sample_step": runner.loader_sample_step,
        "start_index": runner.loader_batch_step * batch_size,  # this rank's consumed indices
        "epoch_metrics": {k: dict(v) for k, v in runner.epoch_metrics.items()},
        "ranks": runner.engine.all_gather_object(local),
    }


def _averages_with_current_batch(runner: Any) -> dict[str, dict[str, torch.Tensor]]:
    # Called during batch_end, before the runner folds this batch's values into its averages:
    # fold them into copies, so the checkpoint covers every batch up to this one.
    states = {}
    for key, value in runner.batch_metrics.items():
        average = AdditiveMetric(metric_key=key, with_std=False).to(runner.device)
        if key in runner._batch_averages:  # copies: update() adds in place
            live = runner._batch_averages[key].get_states()
            average.replace_states({name: t.clone() for name, t in live.items()})
        average.update(value, runner.batch_size)
        states[key] = _cpu_states(average)
    for key, average in runner._batch_averages.items():
        states.setdefault(key, _cpu_states(average))
    return states


def _merge(metric: Metric, saved: list[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    device = metric.device
    return {
        name: _MERGE[kind]([s[name] for s in saved]).to(device)
        for name, kind in metric.reductions.items()
    }


def restore_metrics(runner: Any, position: Mapping[str, Any]) -> None:
    """Put the saved partial metric states back (merged into rank 0)."""
    ranks = position["ranks"]
    merge_here = runner.engine.rank <= 0  # other ranks keep empty states
    for key in ranks[0]["averages"]:  # every rank creates them: the sync packs the same list
        # `_merge` reads only the declared states: older checkpoints' square sums are dropped
        runner._batch_averages[key] = AdditiveMetric(metric_key=key, with_std=False).to(
            runner.device
        )
    if not merge_here:
        return
    for index, metric in enumerate(runner._tracked_metrics):
        metric.replace_states(_merge(metric, [r["tracked"][index] for r in ranks]))
    for key, average in runner._batch_averages.items():
        average.replace_states(_merge(average, [r["averages"][key] for r in ranks]))


def restore_rng(runner: Any, position: Mapping[str, Any]) -> None:
    """This rank's RNG states as saved (when the world size is unchanged)."""
    ranks = position["ranks"]
    rank = max(runner.engine.rank, 0)
    if len(ranks) == runner.engine.world_size:
        restore_rng_state(ranks[rank]["rng"])


def skip_consumed(loader: Any, position: Mapping[str, Any]) -> Iterator[Any]:
    """An iterator over `loader` that starts after the saved batch.

    Resumable samplers (ddprun's distributed samplers) skip indices without loading them;
    any other loader is fast-forwarded by drawing and dropping the consumed batches.
    """
    sampler = getattr(loader, "sampler", None)
    skip = int(position["loader_batch_step"])
    if hasattr(sampler, "load_state_dict") and hasattr(sampler, "state_dict"):
        epoch = sampler.state_dict()["epoch"]
        sampler.load_state_dict({"epoch": epoch, "start_index": int(position["start_index"])})
        return iter(loader)
    iterator = iter(loader)
    for _ in range(skip):
        next(iterator, None)
    return iterator
