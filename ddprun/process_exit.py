"""Leave a distributed worker like a Python program: exit handlers run, files are flushed, and a
finished run exits 0 every time.

The abort this module prevents (torch 2.13, gloo; 2-rank jobs under torchrun on a 2-core box):
a script that ends right after its last collective died with "terminate called without an
active exception" (SIGABRT) in 5/25 runs (DDP model, no `destroy_process_group()`), 7/25 (DDP,
with it) and 10/30 (three plain all-reduces). A core dump shows why: gloo's worker thread
(``pt_gloo_runloop``) drops its reference to the finished work object after the caller has been
woken; the work holds tensors that own Python objects, so the thread must take the GIL to
release them. If the main thread has meanwhile reached interpreter finalization, CPython ends
that thread inside ``take_gil`` (pthread_exit), the forced unwind meets a noexcept destructor
(``~AsyncWork``) and libstdc++ calls std::terminate (pytorch/pytorch#190489; PR #179291
abandoned).

Two more findings shape the fix:

- A DDP model keeps its group alive after `destroy_process_group()`, and not only through its
  reducer: the first DDP model imports ``torch.distributed.nn.functional``, whose functions take
  ``group=group.WORLD`` as a default argument, so the group that exists at that import is
  referenced from those defaults until the interpreter ends. `arm` imports that module before
  any group exists (its defaults are then None, which means "the default group" there too).
- A group's C++ destructor waits for its queued and running collectives and joins its threads.
  With a collective still waiting for a peer (a rank that failed mid-step) it blocks until the
  collective times out (30 min by default).

What a worker does (the launcher's wrapper and spawn mode): `arm` before user code runs, which
registers `_teardown_at_exit` as the first exit handler, so it runs after the user's own handlers
(they may still use the group); `leave(status)` once the script has returned or failed, which
raises SystemExit, so the interpreter exits normally: threads are joined, the user's `atexit`
handlers run, then ddprun's teardown (`release_process_groups`):

1. on success only, a barrier: no peer is still sending to us;
2. wait until gloo's worker threads are idle, i.e. back waiting for work (read from
   /proc/self/task: a futex wait without a timeout; one that waits for the GIL has a timeout),
   so every finished work object has been dropped while the interpreter is fully alive;
3. on success, `destroy_process_group()`, then garbage collection: groups nobody references
   any more are destroyed now, their idle threads joined (a group with a collective still in
   flight is kept referenced instead: its destructor would wait for that collective). After a
   failure the groups are kept as they are: their connections close only when the process is
   gone, so peers learn of the failure from the exit itself and the launcher sees this rank
   fail first, and nothing waits for a peer that may never answer;
4. then finalization flushes every open file and ends the process, with a 30 s watchdog
   (faulthandler: stacks to stderr, exit status 1) should anything still hang there.

Measured here (2 cores, 2 ranks through ddprun): a script with a DDP model that ends right after
three all-reduces, tears nothing down and leaves a file unclosed aborted in 3 of 12 runs with a
plain interpreter exit, and exited 0 with its file complete in 12 of 12 with this teardown
(tests/launcher/test_stress.py runs it 10 times).
"""

from __future__ import annotations

import atexit
import ctypes
import datetime
import faulthandler
import gc
import os
import platform
import sys
import time
import warnings
from typing import Any, NoReturn

__all__ = ["arm", "import_group_default_users", "leave", "release_process_groups"]

# gloo's worker threads (named by torch >= 2.5); the transport and store threads never touch
# Python objects, so only these are waited for.
_RUNLOOP_THREAD = "pt_gloo_runloop"
# futex(2) by architecture: an idle runloop thread sits in futex(..., timeout=NULL).
_FUTEX_SYSCALL = {"x86_64": 202, "aarch64": 98, "riscv64": 98, "ppc64le": 221, "s390x": 238}
_IDLE_SAMPLES = 3  # consecutive idle readings: a thread between two states is never caught
_POLL_SECONDS = 0.005
# After a barrier every collective has finished: threads only need CPU time to drop their work.
_DRAIN_AFTER_BARRIER_SECONDS = 5.0
# After a failure a collective may wait for a peer forever; this long, then the group is kept.
_DRAIN_AFTER_FAILURE_SECONDS = 1.0
# Without named threads (older torch) the old recipe: release the GIL this long.
_BLIND_DRAIN_SECONDS = 0.05
_WATCHDOG_SECONDS = 30.0

# The worker's exit status as given to `leave` (None: the process is ending some other way),
# and the process that armed the teardown (a forked child inherits the exit handler).
_EXIT: dict[str, Any] = {"status": None, "pid": None}
# Groups kept alive on purpose (a failure, a collective in flight): never destroyed.
_KEPT: list[Any] = []


def import_group_default_users() -> None:
    """Import torch modules that capture the default group in default arguments at import.

    Call before the first process group exists: imported later, they would keep that group
    (and its threads) alive until the interpreter ends. Costs ~15 ms.
    """
    try:
        import torch.distributed.nn.functional  # noqa: F401
    except Exception:  # optional parts of torch (rpc) missing: nothing is captured then
        pass


def arm() -> None:
    """Prepare this worker for a normal exit; call once, before user code runs.

    Registers the process-group teardown as an exit handler now, so that it runs after every
    handler the user registers later, and imports `import_group_default_users`'s modules.
    """
    if _EXIT["pid"] == os.getpid():
        return
    _EXIT["pid"] = os.getpid()
    atexit.register(_teardown_at_exit)
    import_group_default_users()


def leave(status: int) -> NoReturn:
    """End the worker with `status` through normal interpreter exit (see the module doc).

    Args:
        status: the exit status; 0 means every rank is expected to finish too (a barrier).
    """
    _EXIT["status"] = status
    raise SystemExit(status)


def _teardown_at_exit() -> None:
    if _EXIT["pid"] != os.getpid():  # a forked child: its parent's groups are not its own
        return
    finished = _EXIT["status"] == 0
    release_process_groups(wait_for_peers=finished, timeout=None, at_exit=True)


def release_process_groups(
    wait_for_peers: bool,
    timeout: datetime.timedelta | None = None,
    at_exit: bool = False,
) -> bool:
    """Destroy the process groups without racing or waiting on their backend threads.

    Args:
        wait_for_peers: pass a barrier with the other ranks first (they finished too); False
            after a failure, when peers may be gone or in another collective.
        timeout: how long the barrier waits; None: the group's own collective timeout.
        at_exit: the process is exiting: a failed barrier is not reported (a peer failed,
            and the launcher reports that), and a watchdog ends the process (status 1,
            stacks on stderr) if it is still alive `_WATCHDOG_SECONDS` after the barrier.

    Returns:
        True if a default group existed (destroyed; kept alive after a failure at exit).
    """
    dist = _dist()
    initialized = bool(dist is not None and dist.is_initialized())
    peers_done = initialized and wait_for_peers and _barrier(dist, timeout, quiet=at_exit)
    if at_exit:
        _arm_watchdog()
    limit = _DRAIN_AFTER_BARRIER_SECONDS if peers_done else _DRAIN_AFTER_FAILURE_SECONDS
    idle = _wait_until_backend_idle(limit, initialized)
    if initialized and at_exit and not peers_done:
        # A failure: keep the groups, and so their connections, until the process is gone.
        # Peers learn of it from the exit itself, so the launcher sees this rank fail first
        # (not a peer that lost its connection while this one was still finalizing).
        _keep_groups(dist)
        return True
    if initialized:
        if not idle:
            _keep_groups(dist)
        dist.destroy_process_group()
    if peers_done and idle and _runloop_threads():
        gc.collect()  # frees groups only unreachable objects (DDP reducers) still hold
    return initialized


def _dist() -> Any:
    if "torch" not in sys.modules:  # never imported: no group can exist
        return None
    import torch.distributed as dist

    return dist if dist.is_available() else None


def _barrier(dist: Any, timeout: datetime.timedelta | None, quiet: bool) -> bool:
    """Wait until every rank arrives; False (a warning unless `quiet`) if a peer failed."""
    try:
        work = dist.barrier(async_op=True)
        if timeout is None:
            work.wait()
        else:
            work.wait(timeout)
    except Exception as exc:  # a dead peer or a timeout must not stop our own teardown
        if not quiet:
            warnings.warn(f"ddprun: barrier before shutdown failed: {exc}", stacklevel=3)
        return False
    return True


def _arm_watchdog() -> None:
    stream = sys.__stderr__
    try:
        if stream is not None:
            faulthandler.dump_traceback_later(_WATCHDOG_SECONDS, exit=True, file=stream)
    except (ValueError, OSError, RuntimeError):  # stderr closed: no watchdog, no crash
        pass


def _keep_groups(dist: Any) -> None:
    """Keep every group alive for good: its destructor would wait for a collective in flight."""
    world = getattr(dist.distributed_c10d, "_world", None)
    groups = list(getattr(world, "pg_map", None) or {}) or [dist.group.WORLD]
    for group in groups:
        if group is not None:
            _KEPT.append(group)
            # finalization clears module globals (and _KEPT), so take a reference no one drops
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(group))


def _runloop_threads() -> list[str] | None:
    """Thread ids of gloo's worker threads; None where /proc cannot tell."""
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    found = []
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/comm") as fp:
                if fp.read().strip() == _RUNLOOP_THREAD:
                    found.append(tid)
        except OSError:  # the thread ended meanwhile
            pass
    return found


def _is_idle(tid: str) -> bool:
    """True if the thread waits without a timeout (for work), not for the GIL or a peer."""
    futex = _FUTEX_SYSCALL.get(platform.machine())
    try:
        if futex is None:
            with open(f"/proc/self/task/{tid}/stat") as fp:
                return fp.read().rsplit(")", 1)[1].split()[0] == "S"
        with open(f"/proc/self/task/{tid}/syscall") as fp:
            fields = fp.read().split()
    except (OSError, IndexError):
        return True  # the thread is gone
    # "<nr> <uaddr> <op> <val> <timeout> ...": futex with a NULL timeout
    return len(fields) > 4 and fields[0] == str(futex) and int(fields[4], 16) == 0


def _wait_until_backend_idle(limit: float, group_exists: bool) -> bool:
    """Release the GIL until gloo's threads are idle (True) or `limit` seconds passed."""
    deadline = time.monotonic() + limit
    streak = 0
    while True:
        tids = _runloop_threads()
        if not tids:
            if group_exists:  # a group without named threads: torch too old to tell
                time.sleep(_BLIND_DRAIN_SECONDS)
            return True
        streak = streak + 1 if all(_is_idle(tid) for tid in tids) else 0
        if streak >= _IDLE_SAMPLES:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(_POLL_SECONDS)
