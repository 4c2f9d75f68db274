"""Rank and world helpers, process-group lifecycle, parent-death signal, the launcher's exit.

The DDP engine, the launcher's worker wrapper and user code share these helpers. The module
imports nothing heavy at import time (torch is imported inside the functions that need it), so
the launcher and each worker can call `set_parent_death_signal` before torch is loaded.
"""

from __future__ import annotations

import atexit
import ctypes
import datetime
import logging
import os
import signal
import socket
import sys
import threading
from typing import Any, NoReturn

__all__ = [
    "LAUNCH_ENV_VARS",
    "cuda_index",
    "exit_process",
    "find_free_port",
    "get_local_rank",
    "get_rank",
    "get_world_size",
    "init_process_group",
    "is_launched",
    "set_parent_death_signal",
    "shutdown_process_group",
]

logger = logging.getLogger(__name__)

#: Variables a launcher (ddprun, torchrun) sets for each worker; all present means "launched".
LAUNCH_ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

# From <linux/prctl.h>; PR_SET_PDEATHSIG is 1 on every Linux architecture.
_PR_SET_PDEATHSIG = 1


def _dist() -> Any:
    """Return `torch.distributed` if this torch build has it, else None."""
    import torch.distributed as dist

    return dist if dist.is_available() else None


def _is_initialized() -> bool:
    dist = _dist()
    return bool(dist is not None and dist.is_initialized())


def get_rank() -> int:
    """Return this process's global rank, or -1 when no process group is initialised."""
    if not _is_initialized():
        return -1
    return int(_dist().get_rank())


def get_world_size() -> int:
    """Return the number of processes in the default group, or 1 when not initialised."""
    if not _is_initialized():
        return 1
    return int(_dist().get_world_size())


def get_local_rank() -> int:
    """Return LOCAL_RANK from the environment (0 when not launched)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_launched() -> bool:
    """Return True when a launcher (ddprun, torchrun) started this process as one worker.

    Returns:
        True if every variable in `LAUNCH_ENV_VARS` is present in the environment.
    """
    return all(name in os.environ for name in LAUNCH_ENV_VARS)


def find_free_port(host: str = "127.0.0.1") -> int:
    """Ask the OS for a TCP port that is free on `host` right now.

    The port is released before returning, so another process may take it before the caller
    binds it; the launcher avoids that race by letting the rendezvous store bind port 0 itself.
    Use this only where a number must be chosen up front (e.g. spawning workers from a script).

    Args:
        host: address to bind while probing.

    Returns:
        A port number in the ephemeral range.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send `sig` to this process when its parent dies (Linux only).

    The kernel tracks the *thread* that forked this process: the signal fires when that thread
    exits, not only when the whole parent process does. ddprun's agent starts workers from its
    main thread, so for ddprun workers the two coincide. If the parent already died before this
    call (a race right after fork), the caller should check `os.getppid()` afterwards.

    Args:
        sig: signal to receive; SIGTERM lets a runner react, SIGKILL cannot be caught.

    Returns:
        True if the signal was set, False on platforms without prctl (a no-op there).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    return True


def _default_backend() -> str:
    import torch

    if os.environ.get("DDPRUN_BACKEND"):
        return os.environ["DDPRUN_BACKEND"]
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_process_group(
    backend: str | None = None,
    timeout: datetime.timedelta | None = None,
    **kwargs: Any,
) -> None:
    """Join the default process group described by the launcher's environment (env://).

    Does nothing if a default group already exists. With a CUDA backend the current device is
    set to the rank's own GPU first (`cuda_index`: ``cuda:0`` when one GPU is visible per
    process, else ``cuda:LOCAL_RANK``), so collectives and DDP use it. A process may
    join again after `shutdown_process_group` (a second ``train``, inference after training):
    every join after the first rendezvous under its own store prefix.

    Args:
        backend: "gloo", "nccl", ...; default: DDPRUN_BACKEND, else nccl with CUDA, else gloo.
        timeout: collective timeout; None keeps torch's default for the backend.
        **kwargs: passed on to `torch.distributed.init_process_group`.
    """
    import torch

    dist = _dist()
    if dist is None:
        raise RuntimeError("this torch build has no torch.distributed support")
    if dist.is_initialized():
        return
    backend = backend or _default_backend()
    if "nccl" in backend and torch.cuda.is_available():
        torch.cuda.set_device(cuda_index(get_local_rank()))
        # NCCL's watchdog would abort the process on a collective timeout (its default), so
        # no rank could say who stopped answering; mode 2 aborts the communicators and lets
        # the timeout raise in Python, where the engine names the silent ranks.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
    if timeout is not None:
        kwargs["timeout"] = timeout
    kwargs.setdefault("init_method", "env://")
    from ddprun.process_exit import import_group_default_users

    import_group_default_users()  # else DDP's first use keeps this group alive until exit
    if _JOINS[0] and kwargs["init_method"] == "env://" and "store" not in kwargs:
        kwargs.update(_rejoin_store(_JOINS[0], timeout))
    dist.init_process_group(backend=backend, **kwargs)
    _JOINS[0] += 1


#: Default groups this process has joined (every rank joins the same sequence of groups).
_JOINS = [0]


def _rejoin_store(joins: int, timeout: datetime.timedelta | None) -> dict[str, Any]:
    """Store arguments for joining again: a fresh env:// rendezvous under a new key prefix.

    torch names groups from 0 again once the default group is destroyed, and the launcher
    agent's store outlives the group, so a plain second env:// join reads the previous group's
    gloo addresses ("Connection refused", seen on the 2nd or 3rd join under ddprun).
    """
    dist = _dist()
    rendezvous_kwargs = {} if timeout is None else {"timeout": timeout}
    store, rank, world_size = next(dist.rendezvous("env://", **rendezvous_kwargs))
    prefix = dist.PrefixStore(f"ddprun/join{joins}/", store)
    return {"init_method": None, "store": prefix, "rank": rank, "world_size": world_size}


def cuda_index(local_rank: int, device_count: int | None = None) -> int:
    """The CUDA device this process computes on.

    One GPU visible per process (``CUDA_VISIBLE_DEVICES`` narrowed per task, as SLURM's
    ``--gpus-per-task`` and Kubernetes do): device 0, whatever the local rank. At least as many
    GPUs as the local rank needs: ``cuda:LOCAL_RANK``. Fewer, but more than one: an error.

    Args:
        local_rank: this process's LOCAL_RANK.
        device_count: visible CUDA devices (default: torch's count).
    """
    if device_count is None:
        import torch

        device_count = torch.cuda.device_count()
    if device_count == 1:
        return 0
    if 0 <= local_rank < device_count:
        return local_rank
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
    raise RuntimeError(
        f"LOCAL_RANK {local_rank} has no GPU of its own: {device_count} visible "
        f"(CUDA_VISIBLE_DEVICES={visible}); start at most {device_count} processes per node, "
        "or give each process one GPU"
    )


def shutdown_process_group(
    timeout: datetime.timedelta | None = datetime.timedelta(seconds=60),
) -> bool:
    """Tear the default process group down after a successful run; safe to call again.

    A barrier (at most `timeout`; a dead peer or a timeout only warns), then the group is
    destroyed without racing gloo's worker threads: see `ddprun.process_exit`, which explains
    the exit-time abort ("terminate called without an active exception") this avoids and
    also runs this teardown when a ddprun worker exits.

    Args:
        timeout: how long the barrier waits for the other ranks; None: the group's timeout.

    Returns:
        True if a group existed and was destroyed, False if there was nothing to do.
    """
    if not _is_initialized():
        return False
    from ddprun.process_exit import release_process_groups

    return release_process_groups(wait_for_peers=True, timeout=timeout)


def _flush_std_streams() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing left to save
            pass


def _flush_logging() -> None:
    for handler in list(logging.getLogger().handlers):
        try:
            handler.flush()
        except Exception:  # a broken handler must not turn success into a crash
            pass


def _join_user_threads() -> None:
    """Wait for non-daemon threads, as a normal interpreter exit would."""
    current = threading.current_thread()
    for thread in threading.enumerate():
        if thread is not current and not thread.daemon and thread.is_alive():
            thread.join()


def exit_process(status: int, run_exit_handlers: bool | None = None) -> NoReturn:
    """Leave a process that holds no process group (the launcher) without finalization.

    Workers do not use this: they exit normally through `ddprun.process_exit`, so that exit
    handlers run and open files are flushed on failure too. The launcher uses it once every
    worker is gone, to skip the ~0.5 s that finalizing torch costs. On success (status 0) the
    exit steps that matter run first: non-daemon threads are joined, `atexit` handlers run,
    logging and stdio are flushed; then `os._exit` ends the process.

    Args:
        status: the exit status.
        run_exit_handlers: force running (True) or skipping (False) the exit steps; default:
            run them only when `status` is 0.
    """
    if run_exit_handlers is None:
        run_exit_handlers = status == 0
    if run_exit_handlers:
        try:
            _join_user_threads()
            atexit._run_exitfuncs()
        except BaseException as exc:  # an exit handler failing must not hide the status
            print(f"ddprun: error in exit handler: {exc!r}", file=sys.stderr)
    _flush_logging()
    _flush_std_streams()
    os._exit(status)
