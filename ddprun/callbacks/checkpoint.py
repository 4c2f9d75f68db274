"""CheckpointCallback: the save policy (what to save, where and when) and stage loads.

Files under ``<logdir>/checkpoints/``: ``best.pth`` and ``last.pth`` (full state), the
``save_n_best`` best epochs of each stage as ``<stage>.<epoch>.pth``, and ``_metrics.json``
(every kept checkpoint with its numeric score and metrics). Only rank 0 writes (atomically);
every rank passes a barrier and then loads the same file. What a checkpoint holds and how a
run resumes from one is `ddprun.core.resume` (the runner restores it); file I/O is
`ddprun.checkpoint`.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddprun import checkpoint as io
from ddprun.callbacks._access import epoch_metric
from ddprun.core import resume
from ddprun.core.callback import Callback, CallbackOrder
from ddprun.core.resume import LOAD_PARTS

if TYPE_CHECKING:
    from ddprun.core.runner import IRunner


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
        resume: a checkpoint path, or "auto" (``last.pth`` when it exists), that the runner
            restores in full (components, scaler, counters, RNG, this callback's bookkeeping)
            when the run starts; finished stages and epochs are not run again, and a
            mid-epoch checkpoint continues at the next batch (see `ddprun.core.resume`).
            Default: None, or "auto" when the launcher restarted the workers
            (``TORCHELASTIC_RESTART_COUNT`` > 0).
        save_every_n_batches: also write ``last.pth`` every N training batches, with the
            position in the epoch, the partial metric states of every rank, RNG states and,
            inside a gradient-accumulation window, every rank's accumulated gradients (so a
            resume is bit-exact for any N and ``accumulation_steps``; see ddprun.core.resume).
            A stop signal (SIGTERM, SIGUSR1) writes it too, after the current batch.
        async_save: write checkpoints in the background (`IEngine.save_checkpoint` with
            ``async_``): the state is copied to CPU memory and training goes on while it is
            written. The next save, a stage load, the end of the run and a resume wait for it;
            a crash during the write leaves the previous checkpoint intact. Saves on a stop
            signal stay synchronous (the process is about to exit).
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
        async_save: bool = False,
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
        self.async_save = bool(async_save)
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
    def resume_source(self) -> Path | list[Path] | None:
        """What the run resumes from (read by the runner at its start): a named checkpoint,
        the folder's checkpoints to take the newest intact one of ("auto"), or None."""
        restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0
        return resume.resume_source(self.resume, self.folder, restarted)

    def on_stage_start(self, runner: IRunner) -> None:
        if runner.resumed_checkpoint is not None:
            # the runner skipped or restored this stage: only this callback's bookkeeping
            self._restore_bookkeeping(runner.resumed_checkpoint.get("checkpointer"))
            return
        if runner.global_epoch_step > 0:
            self._restore_bookkeeping(self._read_metrics_file())
        self._load(runner, self.load_on_stage_start, "load_on_stage_start")

    def on_batch_end(self, runner: IRunner) -> None:
        if self.folder is None or not runner.is_train_loader:
            return
        n = self.save_every_n_batches
        if runner.stop_signal is not None or (n and runner.loader_batch_step % n == 0):
            # mid-epoch: with the position of every rank (a collective: every rank is here)
            state = self._pack(runner, epoch_finished=False)
            background = self.async_save and runner.stop_signal is None
            last = runner.engine.checkpoint_path(self.folder, "last")
            runner.engine.save_checkpoint(state, last, async_=background)

    def on_epoch_end(self, runner: IRunner) -> None:
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
            "metrics": resume.numeric_metrics(runner.epoch_metrics),
        }
        keep, dropped = self._rank_stage(record)
        is_best = self.best is None or self._better(score, self.best["score"])
        if is_best:
            self.best = record
        self.last = record
        targets = [runner.engine.checkpoint_path(self.folder, "last")]
        targets += [runner.engine.checkpoint_path(self.folder, "best")] if is_best else []
        targets += [self.folder / record["file"]] if keep else []
        bookkeeping = copy.deepcopy(self._bookkeeping())  # as of this save (async: later)

        def written() -> None:  # on the master, once the files are in place
            for old in dropped:
                runner.engine.remove_checkpoint(self.folder / old["file"])
            io.save_json(bookkeeping, self.folder / "_metrics.json")

        state = self._pack(runner, epoch_finished=True)
        runner.engine.save_checkpoint(state, targets, async_=self.async_save, on_written=written)

    def on_experiment_end(self, runner: IRunner) -> None:
        runner.engine.wait_for_checkpoint()  # collective: every rank, before the teardown

    def on_exception(self, runner: IRunner) -> None:
        try:  # keep what was written in the background; never hide the run's own error
            runner.engine.wait_for_checkpoint(collective=False)
        except Exception as error:  # noqa: BLE001
            print(f"[ddprun] the background checkpoint write failed too: {error}", flush=True)

    def on_stage_end(self, runner: IRunner) -> None:
        self._load(runner, self.load_on_stage_end, "load_on_stage_end")

    # ------------------------------------------------------------- ranking
    def _score(self, runner: IRunner) -> float:
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
        path = self.folder / "_metrics.json" if self.folder is not None else None
        if path is None or not path.is_file():
            return None
        return json.loads(path.read_text())

    def _pack(self, runner: IRunner, epoch_finished: bool) -> dict[str, Any]:
        return resume.pack(runner, epoch_finished, checkpointer=self._bookkeeping())

    # --------------------------------------------------------------- loading
    def _load(self, runner: IRunner, spec: Mapping[str, str], name: str) -> None:
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
        runner.engine.wait_for_checkpoint()  # best.pth may still be in flight
        for source, parts in by_source.items():
            path = self._path(source, runner.engine)
            if not path.exists():
                raise FileNotFoundError(f"{name}: checkpoint {path} does not exist")
            resume.load_parts(runner, runner.engine.load_checkpoint(path), parts, str(path))
