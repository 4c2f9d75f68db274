"""How a run stops on SIGTERM/SIGUSR1 (preemption: SLURM, Kubernetes, the launcher forwarding).

A signal only sets a flag (`StopFlag`). `StopControl` has the ranks agree on it collectively,
about every `IRunner.stop_check_seconds` of training (a number of batches the ranks agree on)
and at every loader end, so every rank stops after the same batch and none is left waiting in a
collective the others skipped; CheckpointCallback then writes ``last.pth`` with the position,
and the run ends with `RunStopped` (exit status 128 + signal number).
"""

from __future__ import annotations

import signal
import threading
import time
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


class StopControl:
    """The run's stop signal, from the handler to the batch where every rank acts on it.

    Owns the signal flag, the pacing of the cross-rank agreement and its answer; the engine only
    carries the bits (`IEngine.agree_to_stop` / `drain_stop_agreement`). The runner calls it at
    two points: after every train batch (`after_train_batch`) and at every loader end
    (`loader_end_signal`: this rank's vote, cast inside the loader's one metric reduction,
    whose answer the runner sets as `signal`).

    Pacing: the ranks agree about every `seconds` of training, every `max_batches` batches at
    most (or every `every_n_batches`, when set). The number of batches to the next agreement is
    agreed too (the largest any rank proposed), so every rank counts down from the same number
    and agrees at the same train batch. An agreement's answer arrives with the next one (the
    DDP engine pipelines it), so a signal takes effect within about two intervals.
    """

    def __init__(self) -> None:
        self.flag = StopFlag()
        self.signal: int | None = None
        self.start_run(None)

    def start_run(self, engine: Any, pacing: Any = None) -> None:
        """Forget the previous run: no agreed signal; the first agreement after one batch.

        Args:
            engine: carries the agreement (`IEngine.agree_to_stop`).
            pacing: an object with ``stop_check_seconds``, ``stop_check_max_batches`` and
                ``stop_check_every_n_batches`` (the runner); None: 0.2 s, 64, None.
        """
        self.engine, self.signal = engine, None
        self.seconds = float(getattr(pacing, "stop_check_seconds", 0.2))
        self.max_batches = int(getattr(pacing, "stop_check_max_batches", 64))
        every_n_batches = getattr(pacing, "stop_check_every_n_batches", None)
        self.fixed = None if every_n_batches is None else max(1, int(every_n_batches))
        self._every = self.fixed or 1
        self._countdown = self._measured_batches = self._every
        self._since = 0.0
        self._from_loader_start = True

    def start_loader(self) -> None:
        """Measure the step time from here, not across the loader-end sync or evaluation."""
        self._since = time.perf_counter()
        self._measured_batches = self._countdown
        self._from_loader_start = True

    def after_train_batch(self) -> None:
        """Count this batch; agree when the countdown ends (every rank at the same batch)."""
        self._countdown -= 1
        if self._countdown <= 0:
            self._agree()

    def _agree(self) -> None:
        now = time.perf_counter()
        proposal = self._proposal(now)
        self._from_loader_start = False
        self._adopt_answer(*self.engine.agree_to_stop(self.flag.signum, proposal))
        self._countdown = self._measured_batches = self._every
        self._since = now

    def _proposal(self, now: float) -> int:
        """Batches to the next agreement that this rank would like."""
        if self.fixed is not None:
            return self.fixed
        if self._from_loader_start and self._measured_batches < 2:
            # measured from the loader's start, one batch covers no batch_end callbacks (the
            # backward and step): too short a step; measure again over the next batch
            return 1
        step = (now - self._since) / max(self._measured_batches, 1)
        proposal = self.seconds / step if step > 0 else self.max_batches
        return int(min(max(proposal, 1), self.max_batches))

    def _adopt_answer(self, signum: int | None, every: int | None) -> None:
        # None: no agreement was in flight (the first one, or the first after a loader end);
        # every rank gets the same answers at the same calls, so all keep the same count
        if signum is not None:
            self.signal = signum
        if every is not None:
            self._every = every

    def loader_end_signal(self) -> int | None:
        """This rank's vote for the loader-end reduction (a `StopVote` there), with any
        agreement still in flight drained; the reduction's answer becomes `signal`."""
        in_flight, every = self.engine.drain_stop_agreement()
        if every is not None:
            self._every = every  # the drained answer still sets the pace, on every rank
        return self.flag.signum or in_flight
