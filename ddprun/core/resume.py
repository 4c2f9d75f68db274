"""Resume: what a checkpoint holds of a run, and how the runner is restored from one.

`pack` builds a run's checkpoint (components through the engine, counters, RNG, metrics and,
mid-epoch, the loader position: `ddprun.core.resume_position`); `load_parts` restores chosen
parts (stage loads). `Resume` is the runner's restore at experiment start: it finds the
checkpoint (a callback names it through ``resume_source()``: CheckpointCallback's ``resume``;
"auto" takes the newest intact one, verified against its manifest), skips the stages finished
before it was written, restores the saved stage (components, scaler, counters, RNG, accumulated
gradients), and continues a mid-epoch checkpoint's loader at the next batch with the partial
metric states; on another world size, where that position cannot carry over, at the next epoch.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddprun import __version__
from ddprun.atomic import remove_stale_temporaries
from ddprun.checkpoint import CheckpointError, restore_rng_state, rng_state
from ddprun.checkpoint_manifest import checkpoint_candidates
from ddprun.core.resume_position import (
    capture,
    position_on_this_world,
    restore_gradients,
    restore_metrics,
    restore_rng,
    skip_consumed,
)

if TYPE_CHECKING:
    from ddprun.core.runner import IRunner

COMPONENT_PARTS = ("model", "criterion", "optimizer", "scheduler")
COUNTER_PARTS = ("global_epoch_step", "global_batch_step", "global_sample_step")
LOAD_PARTS = COMPONENT_PARTS + COUNTER_PARTS


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
            position = position_on_this_world(runner, position, self.path)
        if position is not None:
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
    first, when ``last.pth`` (or a sharded ``last`` folder) exists there (`Resume` takes the newest intact one); None to
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
    if not any((folder / name).exists() for name in ("last.pth", "last")):  # file or folder
        return None
    return checkpoint_candidates(folder)


def _newest_intact(engine: Any, candidates: list[Path]) -> Path:
    """The newest intact checkpoint of `candidates` (verified on the master, the same on every
    rank); one warning names what was damaged and skipped."""
    chosen, skipped = engine.choose_checkpoint(candidates)
    if chosen is None:
        raise CheckpointError("resume: no intact checkpoint to resume from: " + "; ".join(skipped))
    if engine.is_master:  # nobody writes yet: a killed write's temporary file can go
        remove_stale_temporaries(chosen.parent)
    if skipped and engine.is_master:
        warnings.warn(
            f"resume: skipped damaged checkpoint(s): {'; '.join(skipped)}; resuming from "
            f"the newest intact one, {chosen}",
            stacklevel=3,
        )
    return chosen
