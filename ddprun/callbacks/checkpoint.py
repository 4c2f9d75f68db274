"""CheckpointCallback: the policy (what to save and load, and when). I/O is in ddprun.checkpoint.

Files under ``<logdir>/checkpoints/``: ``best.pth`` and ``last.pth`` (full state), the
``save_n_best`` best epochs of each stage as ``<stage>.<epoch>.pth``, and ``_metrics.json``
(every kept checkpoint with its numeric score and metrics). Only rank 0 writes (atomically);
every rank passes a barrier and then loads the same file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ddprun import __version__
from ddprun import checkpoint as io
from ddprun.callbacks._access import epoch_metric
from ddprun.core import resume
from ddprun.core.callback import Callback, CallbackOrder

COMPONENT_PARTS = ("model", "criterion", "optimizer", "scheduler")
COUNTER_PARTS = ("global_epoch_step", "global_batch_step", "global_sample_step")
LOAD_PARTS = COMPONENT_PARTS + COUNTER_PARTS


def parse_load_spec(spec: str | Mapping[str, str] | None, name: str) -> dict[str, str]:
    """Normalise a load target to ``{part: source}``.

    A string ("best", "last" or a path) loads the model only; a dict names each part
    (model, criterion, optimizer, scheduler, global_epoch_step, global_batch_step,
    global_sample_step) and its source.
    """
    if spec is None:
        return {}
    if isinstance(spec, (str, Path)):
        return {"model": str(spec)}
    if not isinstance(spec, Mapping):
        raise TypeError(f"{name} must be 'best', 'last', a path or a dict, got {spec!r}")
    unknown = sorted(set(spec) - set(LOAD_PARTS))
    if unknown:
        raise ValueError(
            f"{name}: unknown load target(s) {unknown}; expected some of {list(LOAD_PARTS)}"
        )
    return {part: str(source) for part, source in spec.items()}


class CheckpointCallback(Callback):
    """Save best/last/top-N checkpoints each epoch; load them at stage start or end; resume.

    Args:
        logdir: the run folder; files go to ``<logdir>/checkpoints``. None: load-only.
        loader_key, metric_key: the epoch metric that ranks checkpoints; without them the
            newest epoch is the best.
        minimize: whether a lower metric is better. min_delta: the least change that counts
            as an improvement for best.pth.
        save_n_best: how many epoch files each stage keeps (ranked by score, as numbers).
        load_on_stage_start, load_on_stage_end: see `parse_load_spec`. At the first stage
            of a fresh run there is nothing to load yet: it is skipped with one log line.
        resume: a checkpoint path, or "auto" (``last.pth`` when it exists), restored in full
            (components, scaler, counters, RNG, this callback's bookkeeping) before the
            first stage runs; finished stages and epochs are not run again, and a mid-epoch
            checkpoint continues at the next batch. Default: None, or "auto" when the
            launcher restarted the workers (``TORCHELASTIC_RESTART_COUNT`` > 0).
        save_every_n_batches: also write ``last.pth`` every N training batches, with the
            position in the epoch, the partial metric states of every rank, RNG states and,
            inside a gradient-accumulation window, every rank's accumulated gradients (so a
            resume is bit-exact for any N and ``accumulation_steps``; see ddprun.core.resume).
            A stop signal (SIGTERM, SIGUSR1) writes it too, after the current batch.
    """

    def __init__(
        self,
        logdir: str | Path | None = None,
        loader_key: str | None = None,
        metric_key: str | None = None,
        minimize: bool = True,
        min_delta: float = 1e-6,
        save_n_best: int = 1,
        load_on_stage_start: str | Mapping[str, str] | None = None,
        load_on_stage_end: str | Mapping[str, str] | None = None,
        resume: str | Path | None = None,
        save_every_n_batches: int | None = None,
    ) -> None:
        super().__init__(order=CallbackOrder.External)
        if (loader_key is None) != (metric_key is None):
            raise ValueError("CheckpointCallback: give loader_key and metric_key together")
        if save_n_best < 0:
            raise ValueError(f"save_n_best must be >= 0, got {save_n_best}")
        self.folder = Path(logdir) / "checkpoints" if logdir is not None else None
        self.loader_key, self.metric_key = loader_key, metric_key
        self.minimize = bool(minimize) if loader_key is not None else False
        self.min_delta, self.save_n_best = float(min_delta), int(save_n_best)
        self.load_on_stage_start = parse_load_spec(load_on_stage_start, "load_on_stage_start")
        self.load_on_stage_end = parse_load_spec(load_on_stage_end, "load_on_stage_end")
        self.resume = str(resume) if resume is not None else None
        self.save_every_n_batches = save_every_n_batches
        self.records: list[dict[str, Any]] = []  # kept epoch files, every stage
        self.best: dict[str, Any] | None = None
        self.last: dict[str, Any] | None = None

    def apply_train_options(self, load_best_on_end: bool, resume: str | Path | None) -> None:
        """Take ``Runner.train``'s load_best_on_end/resume where this callback sets neither."""
        if load_best_on_end and not self.load_on_stage_end:
            self.load_on_stage_end = parse_load_spec("best", "load_on_stage_end")
        if resume is not None and self.resume is None:
            self.resume = str(resume)

    # ---------------------------------------------------------------- paths
    def _path(self, source: str, engine: Any) -> Path:
        if source in ("best", "last"):
            if self.folder is None:
                raise ValueError(f"CheckpointCallback: {source!r} needs a logdir")
            return engine.checkpoint_path(self.folder, source)
        return Path(source)

    # --------------------------------------------------------------- events
    def on_stage_start(self, runner: Any) -> None:
        if self._resume(runner):
            return
        if runner.global_epoch_step > 0:
            self._restore_bookkeeping(self._read_metrics_file())
        self._load(runner, self.load_on_stage_start, "load_on_stage_start")

    def on_batch_end(self, runner: Any) -> None:
        if self.folder is None or not runner.is_train_loader:
            return
        n = self.save_every_n_batches
        if runner.stop_signal is not None or (n and runner.loader_batch_step % n == 0):
            state = self._pack(runner, epoch_finished=False)
            state["loader_state"] = resume.capture(runner)  # a collective: every rank is here
            runner.engine.save_checkpoint(state, runner.engine.checkpoint_path(self.folder, "last"))

    def on_epoch_end(self, runner: Any) -> None:
        if self.folder is None or runner.stage_key.startswith("infer"):
            return
        score = self._score(runner)
        record = {
            "stage": runner.stage_key,
            "epoch": runner.stage_epoch_step,
            "global_epoch": runner.global_epoch_step,
            "score": score,
            "file": runner.engine.checkpoint_path(
                self.folder, f"{runner.stage_key}.{runner.stage_epoch_step}"
            ).name,
            "metrics": _numeric(runner.epoch_metrics),
        }
        keep, dropped = self._rank_stage(record)
        is_best = self.best is None or self._better(score, self.best["score"])
        if is_best:
            self.best = record
        self.last = record
        targets = [runner.engine.checkpoint_path(self.folder, "last")]
        targets += [runner.engine.checkpoint_path(self.folder, "best")] if is_best else []
        targets += [self.folder / record["file"]] if keep else []
        runner.engine.save_checkpoint(self._pack(runner, epoch_finished=True), targets)
        if runner.engine.is_master:
            for old in dropped:
                runner.engine.remove_checkpoint(self.folder / old["file"])
            io.save_json(self._bookkeeping(), self.folder / "_metrics.json")

    def on_stage_end(self, runner: Any) -> None:
        self._load(runner, self.load_on_stage_end, "load_on_stage_end")

    # ------------------------------------------------------------- ranking
    def _score(self, runner: Any) -> float:
        if self.loader_key is None:
            return float(runner.global_epoch_step)
        value = epoch_metric(runner, self.loader_key, self.metric_key, "CheckpointCallback")
        if math.isnan(value):
            return math.inf if self.minimize else -math.inf
        return value

    def _better(self, score: float, reference: float) -> bool:
        if self.minimize:
            return score < reference - self.min_delta
        return score > reference + self.min_delta

    def _rank_stage(self, record: dict[str, Any]) -> tuple[bool, list[dict[str, Any]]]:
        """Insert `record` among this stage's kept files; return (kept?, files to delete)."""
        if self.save_n_best == 0:
            return False, []
        stage = [r for r in self.records if r["stage"] == record["stage"]]
        sign = 1.0 if self.minimize else -1.0
        ranked = sorted(stage + [record], key=lambda r: (sign * r["score"], r["epoch"]))
        kept, dropped = ranked[: self.save_n_best], ranked[self.save_n_best :]
        self.records = [r for r in self.records if r["stage"] != record["stage"]] + kept
        return record in kept, [r for r in dropped if r is not record]

    # --------------------------------------------------------- persistence
    def _bookkeeping(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "last": self.last,
            "checkpoints": self.records,
            "loader_key": self.loader_key,
            "metric_key": self.metric_key,
            "minimize": self.minimize,
        }

    def _restore_bookkeeping(self, state: Mapping[str, Any] | None) -> None:
        if state:
            self.best, self.last = state.get("best"), state.get("last")
            self.records = list(state.get("checkpoints", []))
            worst = math.inf if self.minimize else -math.inf
            for record in [self.best, self.last, *self.records]:
                if record is not None and record.get("score") is None:  # NaN saved as null
                    record["score"] = worst

    def _read_metrics_file(self) -> dict[str, Any] | None:
        import json

        path = self.folder / "_metrics.json" if self.folder is not None else None
        if path is None or not path.is_file():
            return None
        return json.loads(path.read_text())

    def _pack(self, runner: Any, epoch_finished: bool) -> dict[str, Any]:
        return runner.engine.pack_checkpoint(
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
            metrics=_numeric(runner.epoch_metrics),
            rng=io.rng_state(),
            checkpointer=self._bookkeeping(),
            ddprun_version=__version__,
        )

    # --------------------------------------------------------------- loading
    def _load(self, runner: Any, spec: Mapping[str, str], name: str) -> None:
        by_source: dict[str, list[str]] = {}
        for part, source in spec.items():
            by_source.setdefault(source, []).append(part)
        if runner.global_epoch_step == 0 and ({"best", "last"} & set(by_source)):
            # best/last of this run do not exist yet (files there belong to an older run);
            # explicit paths, such as pretrained weights, still load.
            by_source = {s: p for s, p in by_source.items() if s not in ("best", "last")}
            if runner.engine.is_master:
                print(
                    f"[ddprun] {name}: nothing to load at the start of a fresh run; skipped",
                    flush=True,
                )
        for source, parts in by_source.items():
            path = self._path(source, runner.engine)
            if not path.exists():
                raise FileNotFoundError(f"{name}: checkpoint {path} does not exist")
            self._load_parts(runner, runner.engine.load_checkpoint(path), parts, str(path))

    def _load_parts(
        self, runner: Any, state: Mapping[str, Any], parts: list[str], source: str
    ) -> None:
        components = {p: getattr(runner, p) for p in COMPONENT_PARTS if p in parts}
        runner.engine.unpack_checkpoint(state, **components, source=source)
        for counter in COUNTER_PARTS:
            if counter in parts:
                setattr(runner, counter, int(state[counter]))

    # ---------------------------------------------------------------- resume
    def _resume_source(self) -> str | None:
        if self.resume is not None:
            return self.resume
        # restarted by the launcher (--max-restarts): continue from last.pth by default
        restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0
        return "auto" if restarted and self.folder is not None else None

    def _resume_plan(self, runner: Any) -> dict[str, Any]:
        """The checkpoint this run resumes from, loaded once per run (kept on the runner,
        since callbacks are rebuilt every stage)."""
        if runner.resume_plan is not None:
            return runner.resume_plan
        plan: dict[str, Any] = {"state": None, "path": None}
        source = self._resume_source() if runner.global_epoch_step == 0 else None
        if source is not None:
            path = self._path("last", runner.engine) if source == "auto" else Path(source)
            if source != "auto" or path.exists():
                if not path.exists():
                    raise FileNotFoundError(f"resume: checkpoint {path} does not exist")
                plan = {"state": runner.engine.load_checkpoint(path), "path": str(path)}
                if runner.engine.is_master:
                    print(f"[ddprun] resuming from {path}", flush=True)
        runner.resume_plan = plan
        return plan

    def _resume(self, runner: Any) -> bool:
        """Restore the planned checkpoint if it belongs to this stage; skip earlier stages."""
        plan = self._resume_plan(runner)
        state = plan["state"]
        if state is None:
            return False
        stages = list(runner.stages)
        saved_stage = state.get("stage_key", runner.stage_key)  # a bare packed checkpoint
        if saved_stage not in stages:
            raise ValueError(
                f"resume: {plan['path']} was written in stage {saved_stage!r}, which is not "
                f"one of this runner's stages {stages}"
            )
        if stages.index(saved_stage) > stages.index(runner.stage_key):
            runner.stage_epoch_step = runner.stage_epoch_len  # finished before the save
            return True
        plan["state"] = None  # consumed
        parts = [p for p in LOAD_PARTS if p in COMPONENT_PARTS or p in state]
        self._load_parts(runner, state, parts, plan["path"])
        runner.stage_epoch_step = int(state.get("stage_epoch_step", 0))
        position = state.get("loader_state")
        if not state.get("epoch_finished", True) and position is not None:
            # rerun the saved epoch from the batch after the one the checkpoint was written at
            runner.stage_epoch_step -= 1
            runner.global_epoch_step -= 1
            runner.resume_position = position
            # a save inside an accumulation window: the window's gradients (each rank's own)
            resume.restore_gradients(runner, position, plan["path"])
        io.restore_rng_state(state.get("rng"))
        self._restore_bookkeeping(state.get("checkpointer"))
        return True


def _numeric(metrics: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    return {loader: {k: float(v) for k, v in values.items()} for loader, values in metrics.items()}
