"""DataLoader worker processes that leave the stop decision to their rank (preemption).

A stop signal (SIGTERM, SIGUSR1) belongs to the main process: it sets a flag, the ranks agree
on a batch, CheckpointCallback writes ``last.pth`` and the run exits 128 + the signal number
(`ddprun.core.stop`). Schedulers rarely signal the main process alone, though: ddprun's launcher
(like torch's agent) forwards to each rank's process group, ``scancel`` signals every process of
the job step, ``kill -- -PGID`` a whole group. A DataLoader worker has the default disposition
(torch's handler only exits quietly when its parent sends SIGTERM), so it died first and the
rank crashed with "DataLoader worker ... killed by signal" before anything was saved.

`shield_loader_workers` gives every loader that has worker processes a multiprocessing context
of the same start method whose processes:

- never act on a stop signal: the starting thread blocks SIGTERM and SIGUSR1 around
  ``Process.start()``, so a worker inherits the blocked mask from its first instruction (fork,
  and spawn through exec), and blocks them itself when it starts running (a forkserver's fork);
- still end when their own process asks: a thread in the worker takes the blocked signals
  (``sigwaitinfo``) and exits 0 on a SIGTERM sent by the process that started it, which is what
  ``terminate()`` sends at DataLoader shutdown and at interpreter exit (a worker that merely
  ignored SIGTERM would hang that exit's ``join``); other senders are ignored;
- die with that process (parent-death signal SIGKILL): a rank that ends without shutting its
  loaders down (a crash, a kill) would otherwise leave them to torch's watchdog, which takes up
  to 5 s. The kernel
  ties this signal to the thread that forked, so it is set only for workers started from the
  main thread by their own parent; others (a forkserver's) rely on torch's watchdog.

Decisions: the user's ``worker_init_fn`` is left as it is (nothing to chain); the start method
is the loader's own, or the default one when it has none (this fixes the default, as starting
the workers would); a custom context (a user subclass) is left alone, with a warning; workers
already running (a persistent loader iterated before the run) keep their settings; processes
that a worker itself starts inherit the blocked mask, like any signal mask, so end those with
SIGKILL or unblock the signals in them. SIGINT is untouched (torch's workers exit quietly on it).

Covered: fork and spawn. With forkserver (Python 3.14's default on Linux) the workers are
shielded once they run, but the forkserver process itself is Python's, shared with any other use
of it, and sits in the rank's process group: a forwarded or group-wide signal kills it, and
torch's workers then leave because their parent changed. Pass ``multiprocessing_context="fork"``
or ``"spawn"`` where preemption matters.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import warnings
from collections.abc import Mapping
from multiprocessing import context, forkserver
from typing import Any

from torch.utils.data import DataLoader

from ddprun.core.stop import STOP_SIGNALS
from ddprun.distributed import get_rank, set_parent_death_signal

__all__ = ["shield_loader_workers"]

_SUPPORTED = hasattr(signal, "pthread_sigmask") and hasattr(signal, "sigwaitinfo")


def _take_stop_signals(owner: int) -> None:
    """Worker thread: consume the blocked stop signals; leave on the owner's SIGTERM."""
    while True:
        info = signal.sigwaitinfo(STOP_SIGNALS)
        if info.si_signo == signal.SIGTERM and info.si_pid == owner:
            os._exit(0)  # what torch's own handler does for its parent's SIGTERM


class _ShieldedProcess:
    """Mixin for a concrete multiprocessing Process class: see the module docstring."""

    _ddprun_owner = 0
    _ddprun_die_with_owner = False

    def start(self) -> None:
        self._ddprun_owner = os.getpid()
        self._ddprun_die_with_owner = threading.current_thread() is threading.main_thread()
        if self._start_method == "forkserver":  # type: ignore[attr-defined]
            # started here it would inherit the blocked mask and pass it to every process it
            # forks later, the user's own too
            forkserver.ensure_running()
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            super().start()  # type: ignore[misc]
        finally:
            # A stop signal that arrived meanwhile was left pending (or went to another
            # thread): it is delivered now, nothing is lost.
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def run(self) -> None:
        owner = self._ddprun_owner
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        threading.Thread(
            target=_take_stop_signals, args=(owner,), name="ddprun-stop-signals", daemon=True
        ).start()
        if self._ddprun_die_with_owner and os.getppid() == owner:
            set_parent_death_signal(signal.SIGKILL)
            if os.getppid() != owner:  # the owner died before prctl took effect
                os._exit(0)
        super().run()  # type: ignore[misc]


if _SUPPORTED:

    class _ForkProcess(_ShieldedProcess, context.ForkProcess):
        pass

    class _SpawnProcess(_ShieldedProcess, context.SpawnProcess):
        pass

    class _ForkServerProcess(_ShieldedProcess, context.ForkServerProcess):
        pass

    class _ForkContext(context.ForkContext):
        Process = _ForkProcess

    class _SpawnContext(context.SpawnContext):
        Process = _SpawnProcess

    class _ForkServerContext(context.ForkServerContext):
        Process = _ForkServerProcess

    # Exact stdlib context types (what a start-method name gives) -> their shielded twin.
    _SHIELDED = {
        context.ForkContext: _ForkContext(),
        context.SpawnContext: _SpawnContext(),
        context.ForkServerContext: _ForkServerContext(),
    }
    _BY_METHOD = {ctx.get_start_method(): ctx for ctx in _SHIELDED.values()}


def _start_resource_tracker_shielded() -> None:
    """Start Python's resource tracker with the stop signals blocked (inherited through exec).

    A spawn or forkserver loader's queues register their semaphores with the tracker, a process
    in the rank's process group that ignores SIGTERM but dies of SIGUSR1 (SLURM's warning):
    "resource_tracker: process died unexpectedly" and a traceback per semaphore. Started here,
    before the loader's first queue, it never sees a stop signal. A tracker already running
    (started by other code) is left as it is.
    """
    from multiprocessing import resource_tracker

    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        resource_tracker.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def shield_loader_workers(loaders: Mapping[str, Any]) -> None:
    """Keep the stop signals away from the worker processes of every DataLoader in `loaders`.

    Replaces, in place, the ``multiprocessing_context`` of each DataLoader with
    ``num_workers > 0`` by a shielded one of the same start method (see the module docstring);
    other loaders are left alone. Idempotent, so a loader reused across stages keeps its
    persistent workers. A no-op where the platform lacks ``sigwaitinfo`` (Windows, macOS).
    """
    if not _SUPPORTED:
        return
    for key, loader in loaders.items():
        if not isinstance(loader, DataLoader) or loader.num_workers <= 0:
            continue
        current = loader.multiprocessing_context
        if current is None:
            # allow_none: asking must not fix the process's start method for the user
            method = multiprocessing.get_start_method(allow_none=True)
            method = method or multiprocessing.get_all_start_methods()[0]
            loader.multiprocessing_context = _BY_METHOD[method]
        elif type(current) in _SHIELDED:
            loader.multiprocessing_context = _SHIELDED[type(current)]
        elif current not in _SHIELDED.values() and get_rank() <= 0:
            warnings.warn(
                f"ddprun: loader {key!r} uses a custom multiprocessing context "
                f"({type(current).__qualname__}); its worker processes keep the default "
                "SIGTERM/SIGUSR1 handling, so a stop signal sent to the rank's process group "
                "(as ddprun's launcher forwards it) or to every process (scancel) kills them "
                "before the run can save. Pass a start method name "
                "('fork', 'spawn', 'forkserver') as multiprocessing_context instead.",
                stacklevel=2,
            )
        if loader.multiprocessing_context.get_start_method() != "fork":
            _start_resource_tracker_shielded()
