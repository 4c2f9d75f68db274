"""Graceful stop on SIGTERM/SIGUSR1 (preemption: SLURM, Kubernetes, the launcher forwarding).

A signal only sets a flag. About every `IRunner.stop_check_seconds` of training (a number of
batches the ranks agree on) and at every loader end, the ranks agree on it collectively (the
engine's `agree_to_stop`), so every rank stops after the same batch and none is left waiting in a
collective the others skipped; CheckpointCallback then writes ``last.pth`` with the position,
and the run ends with `RunStopped` (exit status 128 + signal number).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import torch

from ddprun.metrics import Metric

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class RunStopped(SystemExit):
    """The run was stopped by a signal after saving its state; the exit status says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + int(signum))
        self.signum = int(signum)

    def __str__(self) -> str:
        return f"stopped by {signal.Signals(self.signum).name} after saving last.pth"


class StopVote(Metric):
    """This rank's stop flag as a "sum" state, synced in the loader-end metric reduction, so
    agreeing at loader ends costs no collective of its own."""

    def __init__(self, signum: int | None, device: torch.device) -> None:
        super().__init__(compute_on_call=False)
        self.signum = signum
        self.add_state("votes", torch.zeros(1, dtype=torch.float64), "sum")
        self.to(device)
        if signum is not None:
            self.votes.fill_(1.0)

    def update(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to accumulate: the vote is set when the vote is built."""

    def compute(self) -> int | None:
        """The agreed stop signal (this rank's, or SIGTERM when only peers were signalled)."""
        if float(self.votes.sum()) == 0:
            return None
        return self.signum or int(signal.SIGTERM)

    def compute_key_value(self) -> dict[str, float]:
        return {}


class StopFlag:
    """Installs flag-setting handlers for `STOP_SIGNALS` while a run is active.

    Handlers are installed only in the main thread and only where the signal still has its
    default disposition, so a user's own handler is left alone.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum

    def install(self) -> None:
        """Start catching the stop signals (no-op off the main thread)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in STOP_SIGNALS:
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        """Give the signals their previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
