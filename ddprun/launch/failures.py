"""Which worker failed first, and what the launcher says about it.

When one rank fails, its peers usually fail too, a moment later, of the lost connection
("Connection closed by peer"): the root cause must be told from these echoes. Each worker leaves
an error record (`ddprun.launch.worker`): on an exception, and also when the script caught its
error and called ``sys.exit(N)`` itself (hydra, click), with the exact time and, when the error
is known, whether it is such an echo ("collateral"). The root cause is then the first failure,
in this order:

1. not an echo: the record says so, else (a script that called sys.exit outside an ``except``,
   a rank killed by a signal) the last lines of the rank's output show none of the connection
   errors a peer's death causes; a rank the agent stopped (SIGTERM, or the runner's save-and-
   stop exit 143/138) is an echo too;
2. earliest exact time (torch's own choice compares whole seconds, so an echo in the same
   second as its cause often won);
3. first detected.

The summary names that rank once and shows its traceback, or the last lines of its output
when the script reported the error itself; a restart is announced with the same rank and
reason in one line (`restart_reason`).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from ddprun.launch.worker import PEER_LOSS_MARKERS

__all__ = [
    "FailureView",
    "choose_root_failure",
    "format_failure_summary",
    "report_child_failure",
    "restart_reason",
]

_SUMMARY_TAIL_LINES = 15
_ECHO_TAIL_LINES = 30  # where a peer-loss error would show in a rank's output

#: Exit statuses of workers the runner stopped on a signal, after saving (RunStopped).
STOPPED_STATUSES = {128 + signal.SIGTERM: "SIGTERM", 128 + signal.SIGUSR1: "SIGUSR1"}


class _Logs(Protocol):
    ranks_dir: str
    group_rank: int

    def rank_log(self, rank: int) -> str: ...

    def shows_stderr(self, rank: int, local_rank: int) -> bool: ...


@dataclass(frozen=True)
class FailureView:
    """One failed worker as the summary sees it."""

    rank: int
    local_rank: int
    exitcode: int
    order: int
    message: str
    traceback: str
    extra: dict[str, Any]
    time: float
    echo_in_output: bool = False

    @property
    def collateral(self) -> bool:
        """True when this rank most likely failed because another one did."""
        known = self.extra.get("collateral")
        if known is not None:
            return bool(known)
        stopped = self.exitcode in STOPPED_STATUSES or self.exitcode == -signal.SIGTERM
        return (stopped and not self.traceback) or self.echo_in_output


def tail_lines(path: str, count: int) -> list[str]:
    """The last `count` lines of a text file (none if it cannot be read)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fp:
            return [line.rstrip("\n") for line in fp.readlines()[-count:]]
    except OSError:
        return []


def _view(
    rank: int, failure: ProcessFailure, order: int, rank_log: Callable[[int], str] | None
) -> FailureView:
    message, traceback, extra = "", "", {}
    if isinstance(failure.message, dict):
        message = str(failure.message.get("message", ""))
        info = failure.message.get("extraInfo", {})
        traceback = str(info.get("py_callstack", ""))
        extra = dict(info.get("ddprun", {}))
    elif os.path.isfile(failure.error_file):  # torch's own record (not a ddprun worker)
        message = str(failure.message)
    echo = False
    if extra.get("collateral") is None and rank_log is not None:
        tail = "\n".join(tail_lines(rank_log(rank), _ECHO_TAIL_LINES))
        echo = any(marker in tail for marker in PEER_LOSS_MARKERS)
    when = float(extra.get("time", failure.timestamp))
    return FailureView(
        rank, failure.local_rank, failure.exitcode, order, message, traceback, extra, when, echo
    )


def choose_root_failure(
    failures: Mapping[int, ProcessFailure], rank_log: Callable[[int], str] | None = None
) -> FailureView:
    """Pick the root cause among `failures` (global rank -> failure; see the module doc).

    Args:
        failures: what torch's agent reported, in detection order.
        rank_log: global rank -> its log file, read when a record cannot tell an echo.
    """
    views = [
        _view(rank, failure, order, rank_log)
        for order, (rank, failure) in enumerate(failures.items())
    ]
    return min(views, key=lambda view: (view.collateral, view.time, view.order))


def _signal_name(exitcode: int) -> str:
    number = -exitcode
    return signal.Signals(number).name if number in signal.valid_signals() else f"signal {number}"


def describe(view: FailureView) -> str:
    """Why the rank failed, in a few words: its error, or how it ended."""
    if view.exitcode < 0:
        killed = f"killed by {_signal_name(view.exitcode)}"
        return f"{view.message}, then {killed}" if view.message else killed
    return view.message or f"exit code {view.exitcode}"


def restart_reason(
    failures: Mapping[int, ProcessFailure], rank_log: Callable[[int], str] | None = None
) -> str:
    """One clause for the restart line: which rank failed first and why."""
    root = choose_root_failure(failures, rank_log)
    return f"rank {root.rank} failed ({describe(root)})"


def format_failure_summary(root: FailureView, logs: _Logs, on_console: bool) -> str:
    """The one message the launcher prints when workers failed.

    Args:
        root: the failure to report (`choose_root_failure`).
        logs: where the rank logs are (a `RankLogMirror`).
        on_console: whether the rank's stderr reached the console (its error is above).
    """
    node = root.extra.get("group_rank") or logs.group_rank
    host = root.extra.get("host") or socket.gethostname()
    # "local_rank: N", not "local rank N": the failing rank is named exactly once.
    who = f"rank {root.rank} (local_rank: {root.local_rank}, node: {node}, host: {host})"
    if root.exitcode < 0:
        name = _signal_name(root.exitcode)
        how = "failed, then was killed" if root.message else "was killed"
        lines = [f"ddprun: {who} {how} by {name} (exit code {root.exitcode})"]
    else:
        lines = [f"ddprun: {who} failed with exit code {root.exitcode}"]
    if root.traceback and on_console:
        lines.append(f"{root.message}  (traceback above)")
    elif root.traceback:
        lines.append(root.traceback.rstrip("\n"))
    elif on_console:
        if root.message:
            lines.append(f"{root.message}  (its output is above)")
    else:
        if root.message:
            lines.append(root.message)
        log = logs.rank_log(root.rank)
        lines.append(f"last lines of {log}:")
        lines.extend("  " + line for line in tail_lines(log, _SUMMARY_TAIL_LINES))
    lines.append(f"ddprun: every rank's output: {logs.ranks_dir}{os.sep}rank<N>.log")
    return "\n".join(lines)


def report_child_failure(error: ChildFailedError, logs: _Logs) -> int:
    """Print the summary of a failed launch; return the launcher's exit status."""
    codes = {failure.exitcode for failure in error.failures.values()}
    stops = codes & set(STOPPED_STATUSES)
    # a rank still finishing its exit when the agent stopped the group shows -SIGTERM
    if stops and codes <= {*STOPPED_STATUSES, -signal.SIGTERM}:
        # A signal reached another node (or only the workers): every rank agreed to stop.
        code = max(stops)
        print(
            f"ddprun: the workers stopped on {STOPPED_STATUSES[code]} sent to another node or "
            f"to the workers, after saving (exit code {code})",
            file=sys.stderr,
            flush=True,
        )
        return code
    root = choose_root_failure(error.failures, logs.rank_log)
    on_console = logs.shows_stderr(root.rank, root.local_rank)
    print(format_failure_summary(root, logs, on_console), file=sys.stderr, flush=True)
    return 1
