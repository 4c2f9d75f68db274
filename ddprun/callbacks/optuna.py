"""OptunaPruningCallback: report a loader metric to an Optuna trial every epoch and stop the
trial when its pruner says so (``ddprun[optuna]``)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

from ddprun._optional import import_optional
from ddprun.callbacks._access import epoch_metric
from ddprun.core.callback import Callback, CallbackOrder

if TYPE_CHECKING:
    from ddprun.core.runner import IRunner

__all__ = ["OptunaPruningCallback"]

_KEEP, _PRUNE, _FAILED = 0.0, 1.0, 2.0


def _optuna() -> Any:
    return import_optional("optuna", "optuna", "OptunaPruningCallback")


class OptunaPruningCallback(Callback):
    """Reports ``epoch_metrics[loader_key][metric_key]`` to the trial at every epoch end (step
    ``global_epoch_step``) and raises ``optuna.TrialPruned`` when ``trial.should_prune()``.

    Args:
        loader_key: loader whose metric is reported, e.g. ``"valid"``.
        metric_key: the metric, e.g. ``"loss"`` or ``"accuracy01"``.
        minimize: whether lower is better (for ``trial.best_score``).
        min_delta: smallest change that counts as an improvement of ``best_score``.
        trial: the ``optuna.Trial``; default ``runner.trial`` when the runner has one.

    As in Catalyst, ``trial.best_score`` holds the best reported value, so an objective can
    ``return trial.best_score``.

    Under DDP through a launcher (``python -m ddprun --nproc N``, every rank running the
    study's script): the metric is exact across ranks, rank 0 alone reports to its trial and
    asks its pruner (other ranks may pass ``trial=None``; a trial they hold is never reported
    to), and its decision reaches every rank in one one-element all-reduce per epoch, so every
    rank sets ``need_early_stop`` and raises ``TrialPruned`` after the same epoch and no rank is
    left waiting in a collective. The hyper-parameters every rank trains with must be the same:
    suggest them from a shared storage, enqueue fixed trials, or use a seeded sampler that
    does not depend on reported values. A failure of rank 0's trial (its storage, say) is
    shared the same way and raised on every rank.

    Spawn mode (a DDP engine under plain ``python``) is refused with a clear error: the trial
    lives in the parent process and the workers would report to a copy of it.
    """

    def __init__(
        self,
        loader_key: str,
        metric_key: str,
        minimize: bool,
        min_delta: float = 1e-6,
        trial: Any = None,
    ) -> None:
        super().__init__(order=CallbackOrder.External)
        _optuna()  # fail here, in the user's script, when optuna is missing
        self.loader_key, self.metric_key = loader_key, metric_key
        self.minimize, self.min_delta = bool(minimize), float(min_delta)
        self.trial = trial
        self.best_score: float | None = None
        self._home_pid = os.getpid()

    def on_stage_start(self, runner: IRunner) -> None:
        if self.trial is None:
            self.trial = getattr(runner, "trial", None)
        distributed = runner.engine.world_size > 1
        if distributed and os.getpid() != self._home_pid and self.trial is not None:
            raise RuntimeError(
                "OptunaPruningCallback was built in another process than the one that uses "
                "it (spawn mode: a DDP engine under plain python). Its trial lives in that "
                "parent, so reports from here would be lost and TrialPruned could not reach "
                "study.optimize. Run the study's script under the launcher instead, "
                "`python -m ddprun --nproc N script.py` (rank 0 reports, every rank stops at "
                "the same epoch), or train in one process."
            )
        if self.trial is None and (not distributed or runner.engine.rank == 0):
            raise ValueError(
                "OptunaPruningCallback has no trial: pass trial= (the optuna.Trial of the "
                "objective) or give the runner a `trial` attribute"
            )

    def on_experiment_start(self, runner: IRunner) -> None:
        self.best_score = None  # the best of every value reported in this experiment

    def on_epoch_end(self, runner: IRunner) -> None:
        score = epoch_metric(runner, self.loader_key, self.metric_key, "OptunaPruningCallback")
        if self.best_score is None or self._improved(score):
            self.best_score = score
        engine = runner.engine
        reporter = engine.rank <= 0
        decision, error = _KEEP, None
        if reporter:
            try:
                decision = self._report(score, runner.global_epoch_step)
            except Exception as exc:  # shared below, so no peer waits in the all-reduce
                decision, error = _FAILED, exc
        if engine.collectives is not None:
            flag = torch.tensor([decision], dtype=torch.float32, device=engine.device)
            decision = float(engine.collectives.all_reduce(flag, "max").item())  # once an epoch
        if error is not None:
            raise error
        if decision == _FAILED:
            raise RuntimeError("OptunaPruningCallback: rank 0's trial failed; see rank 0's error")
        if self.trial is not None:
            self.trial.best_score = self.best_score
        if decision == _PRUNE:
            runner.need_early_stop = True
            raise _optuna().TrialPruned(
                f"Trial was pruned at epoch {runner.stage_epoch_step} "
                f"({self.loader_key}/{self.metric_key} = {score:g})."
            )

    def _report(self, score: float, step: int) -> float:
        self.trial.report(score, step=int(step))
        return _PRUNE if self.trial.should_prune() else _KEEP

    def _improved(self, score: float) -> bool:
        gain = self.best_score - score if self.minimize else score - self.best_score
        return gain >= self.min_delta
