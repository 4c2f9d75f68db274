"""The mid-epoch position of a run: what a checkpoint needs to continue a loader at its next
batch, captured and put back for `ddprun.core.resume` (its only user).

`capture` runs on every rank (it gathers each rank's partial metric states, RNG state and
accumulated gradients in one collective); restoring puts them back, whatever the new world size:
partial metric states are all "sum"-like, so rank 0 takes the states of every saved rank merged
and the other ranks start empty, which gives the same loader metrics. The data position carries
over to another world size when the samples seen split into whole batches per new rank
(`position_on_this_world`); otherwise the run continues at the next epoch boundary.

Gradients: a save inside a gradient-accumulation window (OptimizerCallback with
``accumulation_steps`` > 1) finds the window's gradients on the parameters; under DDP they are
rank-local (accumulated under ``no_sync``, all-reduced only on the step batch). Each rank's are
saved and, on the same world size, each rank gets its own back, so the resumed run is bit-exact.
On another world size every rank gets their mean instead (with one warning): DDP's step
averages over ranks, so the saved batches still add the same amount to the window's step, but
the run is not bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ddprun.checkpoint import restore_rng_state, rng_state
from ddprun.metrics import AdditiveMetric, Metric

if TYPE_CHECKING:
    from ddprun.core.runner import IRunner

_MERGE = {
    "sum": lambda ts: torch.stack(ts).sum(dim=0),
    "max": lambda ts: torch.stack(ts).amax(dim=0),
    "min": lambda ts: torch.stack(ts).amin(dim=0),
    "cat": lambda ts: torch.cat(ts),
}


def _cpu_states(metric: Metric) -> dict[str, torch.Tensor]:
    return {name: t.detach().cpu().clone() for name, t in metric.get_states().items()}


def capture(runner: IRunner) -> dict[str, Any]:
    """The running loader's position, partial metrics (every rank's) and RNG states."""
    local = {
        "tracked": [_cpu_states(m) for m in runner.loader_sync.tracked],
        "averages": _averages_with_current_batch(runner),
        "rng": rng_state(),
        "grads": _gradients(runner),
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


def _averages_with_current_batch(runner: IRunner) -> dict[str, dict[str, torch.Tensor]]:
    # Called during batch_end, before the runner folds this batch's values into its averages:
    # fold them into copies, so the checkpoint covers every batch up to this one.
    states, averages = {}, runner.loader_sync.averages
    for key, value in runner.batch_metrics.items():
        average = AdditiveMetric(metric_key=key, with_std=False).to(runner.device)
        if key in averages:  # copies: update() adds in place
            live = averages[key].get_states()
            average.replace_states({name: t.clone() for name, t in live.items()})
        average.update(value, runner.batch_size)
        states[key] = _cpu_states(average)
    for key, average in averages.items():
        states.setdefault(key, _cpu_states(average))
    return states


def _merge(metric: Metric, saved: list[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    device = metric.device
    return {
        name: _MERGE[kind]([s[name] for s in saved]).to(device)
        for name, kind in metric.reductions.items()
    }


def restore_metrics(runner: IRunner, position: Mapping[str, Any]) -> None:
    """Put the saved partial metric states back (merged into rank 0)."""
    ranks = position["ranks"]
    merge_here = runner.engine.rank <= 0  # other ranks keep empty states
    averages = runner.loader_sync.averages
    for key in ranks[0]["averages"]:  # every rank creates them: the sync packs the same list
        # `_merge` reads only the declared states: older checkpoints' square sums are dropped
        averages[key] = AdditiveMetric(metric_key=key, with_std=False).to(runner.device)
    if not merge_here:
        return
    for index, metric in enumerate(runner.loader_sync.tracked):
        metric.replace_states(_merge(metric, [r["tracked"][index] for r in ranks]))
    for key, average in averages.items():
        average.replace_states(_merge(average, [r["averages"][key] for r in ranks]))


def _modules(runner: IRunner) -> dict[str, nn.Module]:
    """The model's and the criterion's modules: ``model``, ``model/<key>`` (a dict), ...
    (a criterion can hold trainable parameters)."""
    modules = {}
    for part in ("model", "criterion"):
        component = runner.engine.unwrap(getattr(runner, part))
        named = component if isinstance(component, Mapping) else {None: component}
        for key, module in named.items():
            if isinstance(module, nn.Module):
                modules[part if key is None else f"{part}/{key}"] = module
    return modules


def _gradients(runner: IRunner) -> dict[str, dict[str, torch.Tensor]] | None:
    """This rank's gradients, ``{module (see _modules): {parameter name: CPU copy}}``; None
    when no parameter holds one (the usual case: saves right after an optimizer step)."""
    grads = {}
    for key, module in _modules(runner).items():
        named = {
            name: p.grad.detach().to("cpu", copy=True)
            for name, p in module.named_parameters()
            if p.grad is not None
        }
        if named:
            grads[key] = named
    return grads or None


def restore_gradients(runner: IRunner, position: Mapping[str, Any], source: str = "") -> None:
    """Put the gradients saved mid-accumulation back on the parameters (see the module
    docstring); parameters without a saved gradient get none. Checkpoints written before
    gradients were saved leave the parameters untouched."""
    ranks = position["ranks"]
    if any("grads" not in r for r in ranks):
        return
    saved = [r["grads"] for r in ranks]
    engine = runner.engine
    if len(ranks) == engine.world_size:
        grads = saved[max(engine.rank, 0)]
    else:
        grads = _mean_gradients(saved)
        if grads is not None and engine.is_master:
            warnings.warn(
                f"resume: {source or 'the checkpoint'} was saved inside a gradient-accumulation "
                f"window by {len(ranks)} rank(s) and resumes on {engine.world_size}: their "
                "rank-local accumulated gradients cannot carry over one to one, so every rank "
                "starts from their mean (the window's step gets the same contribution from the "
                "saved batches, but the run is not bit-identical to an uninterrupted one)",
                stacklevel=2,
            )
    for key, module in _modules(runner).items():
        named = (grads or {}).get(key, {})
        for name, param in module.named_parameters():
            value = named.get(name)
            param.grad = None if value is None else value.to(param.device, param.dtype, copy=True)


def _mean_gradients(saved: list[Any]) -> dict[str, dict[str, torch.Tensor]] | None:
    """The mean over saved ranks (a rank without a gradient counts as zero), or None."""
    total: dict[str, dict[str, torch.Tensor]] = {}
    for grads in saved:
        for key, named in (grads or {}).items():
            for name, value in named.items():
                slot = total.setdefault(key, {})
                slot[name] = slot[name] + value if name in slot else value.clone()
    for named in total.values():
        for value in named.values():
            value.div_(len(saved))
    return total or None


def restore_rng(runner: IRunner, position: Mapping[str, Any]) -> None:
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


def position_on_this_world(
    runner: IRunner, position: dict[str, Any], source: str
) -> dict[str, Any] | None:
    """`position` for this run's world size, or None (with one warning) when it cannot carry
    over: the run then continues at the next epoch boundary.

    Saved by N ranks after k batches of b samples each, a distributed sampler (ddprun's, or
    one process's seeded shuffle) has handed out the first N*k*b positions of the epoch's
    permutation; M ranks continue exactly from there when they can each skip N*k*b / M
    positions, a whole number of their own batches (a resumable sampler skips the indices,
    any other loader is fast-forwarded by those batches).
    """
    saved, world = len(position["ranks"]), runner.engine.world_size
    if saved == world:
        return position
    loader = runner.loaders.get(position["loader_key"])
    batch_size = getattr(loader, "batch_size", None) or 0
    consumed = int(position["start_index"]) * saved
    if batch_size and consumed % (world * batch_size) == 0:
        start = consumed // world
        return {**position, "start_index": start, "loader_batch_step": start // batch_size}
    if runner.engine.is_master:
        warnings.warn(
            f"resume: {source} was saved in the middle of an epoch by {saved} rank(s) and "
            f"resumes on {world}: its data position cannot carry over (the {consumed} samples "
            f"seen do not split into whole batches of {batch_size or '?'} per rank here), so "
            "the run continues at the next epoch boundary; the rest of that epoch is skipped",
            stacklevel=3,
        )
    return None
