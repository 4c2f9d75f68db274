"""What each worker process runs first, before the user's script.

The agent starts every worker as ``python -u -m ddprun.launch.worker MODE TARGET [ARGS...]``
(MODE is ``script`` or ``module``). In order, the wrapper:

1. asks the kernel for SIGTERM when the launcher dies (PR_SET_PDEATHSIG), so a SIGKILLed
   launcher leaves no orphans; the worker's parent is the agent, i.e. the launcher process;
2. sets OMP_NUM_THREADS to cores // local world size when unset (before torch is imported);
   raises TORCHELASTIC_RESTART_COUNT to the job's count (DDPRUN_RESTART_COUNT: the most
   rounds any node has run, see rendezvous.py; SLURM_RESTART_COUNT: a requeued job), so the
   workers of a node that (re)joined a running job, or of a requeued job, resume from
   last.pth like everyone else;
3. arms `ddprun.process_exit` (its process-group teardown becomes the first exit handler, so
   it runs after the user's own);
4. runs the script as ``__main__`` (runpy) inside torch's error recording (`record` with an
   `ErrorHandler` subclass), so the agent can show the first failing rank's traceback. A script
   that catches its error and calls ``sys.exit(N)`` (hydra, click) gets an error record too:
   the exit time, and the caught exception when ``sys.exit`` ran while handling it, so the
   agent can tell the first failure from its echoes;
5. exits like ``python script.py`` (`process_exit.leave`): non-daemon threads are joined,
   `atexit` handlers run and open files are flushed, on success and on failure alike.

Nothing here runs at import time; `main()` does the work.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
import traceback
from typing import Any, NoReturn

from ddprun import process_exit
from ddprun.distributed import set_parent_death_signal

__all__ = ["main"]

# Errors a rank sees when a *peer* died first. Such a rank waits briefly before printing, since
# the agent usually stops it within a poll interval and only the root cause should be shown.
PEER_LOSS_MARKERS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "Socket closed",
)
_COLLATERAL_GRACE_SECONDS = 2.0

# Frames from these files are launcher plumbing; they are cut from the tracebacks users see.
_INTERNAL_SUFFIXES = (
    os.path.join("ddprun", "launch", "worker.py"),
    "runpy.py",
    "<frozen runpy>",
    os.path.join("multiprocessing", "errors", "__init__.py"),
)


def _arm_parent_death_signal() -> None:
    """Die with the launcher; exit now if it already died before prctl took effect."""
    set_parent_death_signal(signal.SIGTERM)
    expected = os.environ.get("DDPRUN_AGENT_PID")
    if expected and expected.isdigit() and os.getppid() != int(expected):
        os._exit(1)


def _default_omp_threads() -> None:
    """Share the cores between the node's workers unless the user chose a thread count."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    else:
        cores = os.cpu_count() or 1
    local_world_size = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    os.environ["OMP_NUM_THREADS"] = str(max(1, cores // local_world_size))


def _adopt_job_restart_count() -> None:
    """Make TORCHELASTIC_RESTART_COUNT the job's count, not only this node's agent's."""
    names = ("TORCHELASTIC_RESTART_COUNT", "DDPRUN_RESTART_COUNT", "SLURM_RESTART_COUNT")
    counts = [int(value) for value in map(os.environ.get, names) if value and value.isdigit()]
    if counts and max(counts) > 0:
        os.environ["TORCHELASTIC_RESTART_COUNT"] = str(max(counts))


def _is_internal(filename: str) -> bool:
    return filename.endswith(_INTERNAL_SUFFIXES)


def format_user_traceback(exc: BaseException) -> str:
    """Format `exc` like Python does, minus the leading launcher and runpy frames."""
    tb = exc.__traceback__
    while tb is not None and _is_internal(tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def is_collateral(exc: BaseException) -> bool:
    """Guess whether `exc` is the echo of another rank's death rather than a root cause."""
    try:
        import torch.distributed as dist

        kinds = tuple(
            getattr(dist, name)
            for name in ("DistNetworkError", "DistStoreError")
            if hasattr(dist, name)
        )
    except ImportError:
        kinds = ()
    if kinds and isinstance(exc, kinds):
        return True
    if getattr(exc, "raised_on_every_rank", False) and os.environ.get("RANK", "0") != "0":
        # a configuration error every rank raises alike: reported once, from rank 0
        return True
    return any(marker in str(exc) for marker in PEER_LOSS_MARKERS)


def error_record(exc: BaseException) -> dict[str, Any]:
    """Build the error-file payload torch's agent reads, plus ddprun's own fields.

    The layout ({"message": {"message", "extraInfo": {"py_callstack", "timestamp"}}}) is the
    one torch's `ErrorHandler` writes, so torch's `ProcessFailure` parses it. Torch keeps whole
    seconds only; `extraInfo.ddprun.time` keeps the exact time, so the launcher can tell which
    rank failed first when several fail within one second.
    """
    now = time.time()
    env = os.environ
    return {
        "message": {
            "message": f"{type(exc).__name__}: {exc}",
            "extraInfo": {
                "py_callstack": format_user_traceback(exc),
                "timestamp": str(int(now)),
                "ddprun": {
                    "time": now,
                    "rank": env.get("RANK"),
                    "local_rank": env.get("LOCAL_RANK"),
                    "group_rank": env.get("GROUP_RANK"),
                    "host": socket.gethostname(),
                    "collateral": is_collateral(exc),
                },
            },
        }
    }


def _handled_error(exc: SystemExit) -> BaseException | None:
    """The exception a script was handling when it called sys.exit (hydra, click), if any."""
    seen = exc.__cause__ or exc.__context__
    while isinstance(seen, SystemExit):
        seen = seen.__cause__ or seen.__context__
    return seen if isinstance(seen, Exception) else None


def exit_record(exc: SystemExit, status: int) -> dict[str, Any]:
    """The error record of a script that ended itself with a failure status (``sys.exit(1)``).

    Its traceback, if any, was printed by the script; the record names the exception it was
    handling, if ``sys.exit`` ran inside an ``except`` block, and whether that exception is a
    peer's echo ("collateral": None when unknown, the agent then reads the rank's output).
    """
    record = error_record(exc)
    message = record["message"]
    cause = _handled_error(exc)
    message["message"] = f"{type(cause).__name__}: {cause}" if cause else f"exit status {status}"
    message["extraInfo"]["py_callstack"] = ""
    info = message["extraInfo"]["ddprun"]
    info["collateral"] = is_collateral(cause) if cause else None
    info["exit_status"] = status
    return record


def _write_exit_record(exc: SystemExit, status: int) -> None:
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        try:
            _write_atomically(path, json.dumps(exit_record(exc, status)))
        except (OSError, TypeError, ValueError):  # the status still reaches the agent
            pass


def _write_atomically(path: str, text: str) -> None:
    """Write via a temp file and rename: the agent SIGTERMs ranks at any moment, and a
    half-written error file makes torch's agent fail to parse it and abort the launch."""
    temp = f"{path}.{os.getpid()}.tmp"
    with open(temp, "w") as fp:
        fp.write(text)
    os.replace(temp, path)


def _make_error_handler() -> Any:
    """Create torch's ErrorHandler subclass; torch is imported here, after OMP is set."""
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

    class WorkerErrorHandler(ErrorHandler):
        """Writes ddprun's error record (trimmed traceback, exact time) to the error file."""

        def record_exception(self, e: BaseException) -> None:
            path = self._get_error_file_path()
            if path:
                _write_atomically(path, json.dumps(error_record(e)))

    return WorkerErrorHandler()


def _run_target(mode: str, target: str, args: list[str]) -> None:
    """Run the user's script or module as ``__main__`` with its own argv and sys.path[0]."""
    import runpy

    sys.argv = [target, *args]
    if mode == "module":
        # As `python -m`: sys.path[0] stays the working directory.
        runpy.run_module(target, run_name="__main__", alter_sys=True)
        return
    path = os.path.abspath(target)
    sys.path[0] = os.path.dirname(path)
    runpy.run_path(path, run_name="__main__")


def _status_of_system_exit(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)  # sys.exit("message"): Python prints it and exits with 1
    return 1


def _report_failure(exc: BaseException) -> None:
    """Print the user's traceback to this rank's stderr (its log and, for rank 0, the console)."""
    if is_collateral(exc) and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        time.sleep(_COLLATERAL_GRACE_SECONDS)
    sys.stderr.write(format_user_traceback(exc))


def run_recorded(mode: str, target: str, args: list[str]) -> int:
    """Run the target under torch's `record`; return the exit status the worker should have."""
    from torch.distributed.elastic.multiprocessing.errors import record

    try:
        record(_run_target, error_handler=_make_error_handler())(mode, target, args)
    except SystemExit as exc:  # record() already turned SystemExit(0) into a return
        status = _status_of_system_exit(exc.code)
        if status:
            _write_exit_record(exc, status)
        return status
    except KeyboardInterrupt:  # the agent forwarded Ctrl-C: stop quietly, it is not a failure
        return 128 + signal.SIGINT
    except BaseException as exc:
        _report_failure(exc)
        return 1
    return 0


def main(argv: list[str] | None = None) -> NoReturn:
    """Entry point of ``python -m ddprun.launch.worker MODE TARGET [ARGS...]``."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or argv[0] not in ("script", "module"):
        print(
            "usage: python -m ddprun.launch.worker script|module TARGET [ARGS...]", file=sys.stderr
        )
        raise SystemExit(2)
    _arm_parent_death_signal()
    _default_omp_threads()
    _adopt_job_restart_count()
    process_exit.arm()
    process_exit.leave(run_recorded(argv[0], argv[1], argv[2:]))


if __name__ == "__main__":
    main()
