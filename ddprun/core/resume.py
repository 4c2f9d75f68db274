"""Resume: what a checkpoint holds of a run, and how a run is restored from one, in one place.

`pack` builds a run's checkpoint (components through the engine, counters, RNG, metrics and,
mid-epoch, the loader position); `load_parts` restores chosen parts (stage loads). `Resume` is
the runner's restore at experiment start: it finds the checkpoint (a callback names it through
``resume_source()``: CheckpointCallback's ``resume``), skips the stages finished before it was
written, restores the saved stage (components, scaler, counters, RNG, accumulated gradients),
and continues a mid-epoch checkpoint's loader at the next batch with the partial metric states.

Mid-epoch position: `capture` runs on every rank (it gathers each rank's partial metric states,
RNG state and accumulated gradients in one collective); restoring puts them back, whatever the
new world size: partial metric states are all "sum"-like, so rank 0 takes the states of every
saved rank merged and the other ranks start empty, which gives the same loader metrics.

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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ddprun import __version__
from ddprun.checkpoint import CheckpointError, restore_rng_state, rng_state
from ddprun.checkpoint_manifest import checkpoint_candidates
from ddprun.metrics import AdditiveMetric, Metric

if TYPE_CHECKING:
    from ddprun.core.runner import IRunner

COMPONENT_PARTS = ("model", "criterion", "optimizer", "scheduler")
COUNTER_PARTS = ("global_epoch_step", "global_batch_step", "global_sample_step")
LOAD_PARTS = COMPONENT_PARTS + COUNTER_PARTS

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


# ------------------------------------------------------------- a run's checkpoint
def pack(runner: IRunner, epoch_finished: bool, **extra: Any) -> dict[str, Any]:
    """The run's checkpoint: unwrapped component states and the scaler (through the engine),
    stage and counters, RNG, numeric epoch metrics and `extra` (e.g. a callback's bookkeeping).

    Mid-epoch (``epoch_finished=False``) it also holds the loader position of every rank
    (`capture`: a collective, so every rank must call it at the same batch).
    """
    state = runner.engine.pack_checkpoint(
        runner.model,
        runner.criterion,
        runner.optimizer,
        runner.scheduler,
        stage_key=runner.stage_key,
        stage_epoch_step=runner.stage_epoch_step,
        stage_epoch_len=runner.stage_epoch_len,
        epoch_finished=epoch_finished,
        loader_batch_step=runner.loader_batch_step if not epoch_finished else 0,
        global_epoch_step=runner.global_epoch_step,
        global_batch_step=runner.global_batch_step,
        global_sample_step=runner.global_sample_step,
        metrics=numeric_metrics(runner.epoch_metrics),
        rng=rng_state(),
        ddprun_version=__version__,
        **extra,
    )
    if not epoch_finished:
        state["loader_state"] = capture(runner)
    return state


def numeric_metrics(metrics: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """``{loader: {metric: float}}`` of the epoch metrics (tensors and numbers as floats)."""
    return {loader: {k: float(v) for k, v in values.items()} for loader, values in metrics.items()}


def load_parts(
    runner: IRunner, checkpoint: Mapping[str, Any], parts: list[str], source: str
) -> None:
    """Load the named `parts` (see `LOAD_PARTS`) of `checkpoint` into the runner: components
    through the engine (with the scaler), counters as saved."""
    components = {p: getattr(runner, p) for p in COMPONENT_PARTS if p in parts}
    runner.engine.unpack_checkpoint(checkpoint, **components, source=source)
    for counter in COUNTER_PARTS:
        if counter in parts:
            setattr(runner, counter, int(checkpoint[counter]))


class Resume:
    """A run's restore from a checkpoint, driven by the runner (one per run).

    At every stage start (`at_stage_start`, after the stage's components and callbacks are
    built, before its callbacks run): the first call finds and loads the checkpoint; stages
    finished before it was written are skipped (their epoch count is full), the saved stage is
    restored. A run resuming "auto" takes the newest intact checkpoint of its folder (verified
    against its manifest): a damaged ``last.pth`` costs one warning, not the job. While stages
    are skipped or restored, ``runner.resumed_checkpoint`` holds the
    checkpoint, so callbacks take their own bookkeeping from it and load nothing else.
    """

    def __init__(self) -> None:
        self.checkpoint: dict[str, Any] | None = None
        self.path = ""
        self.position: dict[str, Any] | None = None
        self._looked = False

    def at_stage_start(self, runner: IRunner) -> None:
        """Skip or restore the stage that is starting (nothing in a fresh run)."""
        runner.resumed_checkpoint = None
        if not self._looked:
            self._looked = True
            self._load(runner)
        state = self.checkpoint
        if state is None:
            return
        stages = list(runner.stages)
        saved_stage = state.get("stage_key", runner.stage_key)  # a bare packed checkpoint
        if saved_stage not in stages:
            raise ValueError(
                f"resume: {self.path} was written in stage {saved_stage!r}, which is not "
                f"one of this runner's stages {stages}"
            )
        runner.resumed_checkpoint = state
        if stages.index(saved_stage) > stages.index(runner.stage_key):
            runner.stage_epoch_step = runner.stage_epoch_len  # finished before the save
            return
        self.checkpoint = None  # consumed
        self._restore(runner, state)

    def _load(self, runner: IRunner) -> None:
        source = None
        for callback in runner.callbacks.values():
            named = getattr(callback, "resume_source", None)
            source = named() if callable(named) else None
            if source is not None:
                break
        if source is None:
            return
        engine = runner.engine
        path = source if isinstance(source, Path) else _newest_intact(engine, source)
        self.checkpoint, self.path = engine.load_checkpoint(path), str(path)
        if engine.is_master:
            print(f"[ddprun] resuming from {path}", flush=True)

    def _restore(self, runner: IRunner, state: Mapping[str, Any]) -> None:
        parts = [p for p in LOAD_PARTS if p in COMPONENT_PARTS or p in state]
        load_parts(runner, state, parts, self.path)
        runner.stage_epoch_step = int(state.get("stage_epoch_step", 0))
        position = state.get("loader_state")
        if not state.get("epoch_finished", True) and position is not None:
            # rerun the saved epoch from the batch after the one the checkpoint was written at
            runner.stage_epoch_step -= 1
            runner.global_epoch_step -= 1
            self.position = position
            # a save inside an accumulation window: the window's gradients (each rank's own)
            restore_gradients(runner, position, self.path)
        restore_rng_state(state.get("rng"))

    def take_position(self, runner: IRunner) -> dict[str, Any] | None:
        """At an epoch start: the mid-epoch position to continue from (once), with the epoch
        metrics of the loaders finished before it; None when this epoch starts fresh."""
        position, self.position = self.position, None
        if position is None or position["global_epoch_step"] != runner.global_epoch_step:
            return None
        runner.epoch_metrics = {k: dict(v) for k, v in position["epoch_metrics"].items()}
        return position

    @staticmethod
    def continue_loader(runner: IRunner, loader: Any, position: Mapping[str, Any]) -> Iterator[Any]:
        """Batches of `loader` after the one a mid-epoch checkpoint was written at, with the
        loader's counters, partial metric states and RNG as saved."""
        batches = skip_consumed(loader, position)
        runner.loader_batch_step = int(position["loader_batch_step"])
        runner.loader_sample_step = int(position["loader_sample_step"])
        restore_metrics(runner, position)
        restore_rng(runner, position)  # after iter(): a DataLoader draws its seed there
        return batches


def resume_source(
    source: str | Path | None, folder: Path | None, restarted: bool
) -> Path | list[Path] | None:
    """Where a run resumes from: a named checkpoint (`source` as given: no fallback), or for
    ``"auto"`` (and a launcher's restart with no source) the checkpoints in `folder`, newest
    first, when ``last.pth`` exists there (`Resume` takes the newest intact one); None to
    start fresh."""
    if source is None and restarted and folder is not None:
        source = "auto"
    if source is None:
        return None
    if source != "auto":
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"resume: checkpoint {path} does not exist")
        return path
    if folder is None:
        raise ValueError("resume='auto' needs a logdir to find last.pth in")
    if not (folder / "last.pth").exists():
        return None
    return checkpoint_candidates(folder)


def _newest_intact(engine: Any, candidates: list[Path]) -> Path:
    """The newest intact checkpoint of `candidates` (verified on the master, the same on every
    rank); one warning names what was damaged and skipped."""
    chosen, skipped = engine.choose_checkpoint(candidates)
    if chosen is None:
        raise CheckpointError("resume: no intact checkpoint to resume from: " + "; ".join(skipped))
    if skipped and engine.is_master:
        warnings.warn(
            f"resume: skipped damaged checkpoint(s): {'; '.join(skipped)}; resuming from "
            f"the newest intact one, {chosen}",
            stacklevel=3,
        )
    return chosen
