"""ConsoleLogger: one line per loader per epoch on stdout."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from typing_extensions import override

from ddprun.loggers.base import ILogger, Scope, format_value, scalar_metrics

if TYPE_CHECKING:
    from ddprun.core.runner import IRunner

__all__ = ["ConsoleLogger"]


def _join(metrics: Mapping[str, float], per_class: bool = False) -> str:
    """Returns ``" | k: v | k: v"`` with the keys sorted, or an empty string.

    Per-class keys (``.../class_NN``) are left out unless `per_class`: with ten classes they
    would bury the line; CSV and TensorBoard still get them.
    """
    keys = sorted(k for k in metrics if per_class or "/class_" not in k)
    return "".join(f" | {key}: {format_value(metrics[key])}" for key in keys)


class ConsoleLogger(ILogger):
    """Prints loader metrics, e.g. ``train (1/3) [stage train] | accuracy01: 0.9612 | loss: 0.1234``.

    Batch scope prints nothing. Epoch scope prints one ``* Epoch (e/E)`` line only when the
    ``"_epoch_"`` entry has values (for example ``lr``): the loaders were printed already.

    Args:
        log_hparams: also print the hyper-parameters given to ``log_hparams``.
        per_class: also print per-class metrics (``precision/class_00`` ...).
    """

    def __init__(self, log_hparams: bool = False, per_class: bool = False) -> None:
        self.log_hparams_enabled = log_hparams
        self.per_class = per_class

    @override
    def log_metrics(self, metrics: Mapping[str, Any], scope: Scope, runner: IRunner) -> None:
        if scope == "loader":
            self._print(
                f"{runner.loader_key} {self._epoch(runner)}"
                f"{_join(scalar_metrics(metrics), self.per_class)}"
            )
        elif scope == "epoch" and metrics.get("_epoch_"):
            self._print(f"* Epoch {self._epoch(runner)}{_join(scalar_metrics(metrics['_epoch_']))}")

    @override
    def log_hparams(self, hparams: Mapping[str, Any], runner: IRunner) -> None:
        if self.log_hparams_enabled:
            self._print("Hparams" + "".join(f" | {k}: {hparams[k]}" for k in sorted(hparams)))

    @staticmethod
    def _epoch(runner: IRunner) -> str:
        return f"({runner.stage_epoch_step}/{runner.stage_epoch_len}) [stage {runner.stage_key}]"

    @staticmethod
    def _print(line: str) -> None:
        # flush, so the line shows up at once in logs captured from non-interactive workers.
        print(line, flush=True)
