"""Worker output: every rank's log file, and the chosen streams on the launcher's console.

torch's agent redirects every worker's stdout and stderr (Std.ALL). `RankLogsSpecs`, a
`DefaultLogsSpecs` subclass, hands each attempt's layout to `RankLogMirror`, which decides where
each stream goes and follows it:

- A stream shown on the console without a prefix (rank 0's, unless redirected) is a live
  channel: a pty when the launcher's matching stream is a terminal, so the worker's
  ``isatty()`` is True and colours and tqdm behave as under torchrun, else a FIFO. The agent
  opens the channel's path as the worker's stdout/stderr; bytes reach the console unchanged,
  carriage returns included, as soon as they are written. When the launcher's stdout and
  stderr are the same terminal or file, rank 0's two streams share one channel (copied to the
  launcher's stdout), so their relative order is kept.
- Any other stream goes to torch's per-attempt file (``<logdir>/elastic/<run>_*/attempt_<k>/
  <local rank>/std{out,err}.log``), followed in binary. With ``--tee`` it also reaches the
  console one complete line at a time, prefixed ``[rank<N>]:`` (a line redrawn with carriage
  returns shows its final state: N ranks' bars cannot redraw in place on one console).
- Both streams of global rank N are appended to ``<logdir>/ranks/rank<N>.log`` as complete
  lines; a line redrawn with carriage returns (a progress bar) is written once, in its final
  state. The file is opened in append mode at every attempt, so restarts keep all output.

Decisions: the pty gets the launcher terminal's size when the worker starts (a later resize is
not passed on) and no input (the worker's stdin stays the launcher's). The byte plumbing (line
assembly, sinks, followers, ptys and FIFOs) is `ddprun.launch.streams`.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping

from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
from torch.distributed.elastic.multiprocessing.api import LogsDest

from ddprun.launch.streams import (
    ChannelReader,
    Console,
    FileFollower,
    Follower,
    RankLog,
    Route,
    open_channel,
    same_destination,
)

__all__ = ["RankLogMirror", "RankLogsSpecs"]

ConsoleChoice = Callable[[int, int], tuple[bool, bool]]


def _default_console(tee_all: bool) -> ConsoleChoice:
    return lambda rank, _: (rank == 0 or tee_all,) * 2


class RankLogMirror:
    """Routes each attempt's worker output to rank<N>.log and the console (see module doc)."""

    def __init__(
        self,
        ranks_dir: str,
        tee_all: bool,
        max_restarts: int,
        console: ConsoleChoice | None = None,
    ) -> None:
        self.ranks_dir = ranks_dir
        self.group_rank = 0
        #: Why the next attempt is a restart, said once before it starts (set by the agent).
        self.restart_reason: str | None = None
        self._prefixed = tee_all  # console lines carry [rank<N>]:
        # (rank, local rank) -> (stdout, stderr) on the console; `LaunchSettings.console_streams`
        self._console = console or _default_console(tee_all)
        self._max_restarts = max_restarts
        self._followers: list[Follower] = []
        self._logs: list[RankLog] = []
        self._out, self._err = Console(sys.stdout), Console(sys.stderr)

    def rank_log(self, rank: int) -> str:
        """Path of global rank `rank`'s log file."""
        return os.path.join(self.ranks_dir, f"rank{rank}.log")

    def shows_stderr(self, rank: int, local_rank: int) -> bool:
        """Whether this rank's stderr (its traceback) reached the console."""
        return self._console(rank, local_rank)[1]

    def start_attempt(self, envs: Mapping[int, Mapping[str, str]], dest: LogsDest) -> None:
        """Stop following the previous attempt; route the workers about to start.

        Rewrites `dest` for live streams (their paths become a pty or FIFO).
        """
        self.close()
        if not envs:
            return
        restart = int(envs[0].get("TORCHELASTIC_RESTART_COUNT", "0"))
        self.group_rank = int(envs[0].get("GROUP_RANK", "0"))
        self._announce_restart(restart)
        for local_rank, env in sorted(envs.items()):
            self._follow_rank(int(env["RANK"]), local_rank, restart, dest)

    def _announce_restart(self, restart: int) -> None:
        reason, self.restart_reason = self.restart_reason, None
        if restart <= 0 and reason is None:
            return
        count = f" (restart {restart} of {self._max_restarts})" if restart > 0 else ""
        print(
            f"ddprun: {reason or 'workers failed'}; restarting all of them{count}; "
            f"see {self.ranks_dir}",
            file=sys.stderr,
            flush=True,
        )

    def _follow_rank(self, rank: int, local_rank: int, restart: int, dest: LogsDest) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        log = RankLog(
            self.rank_log(rank),
            f"===== ddprun attempt {restart}: rank {rank}, local rank {local_rank}, "
            f"node {self.group_rank}, {stamp} =====",
        )
        self._logs.append(log)
        shown = self._console(rank, local_rank)
        prefix = f"[rank{rank}]: ".encode() if self._prefixed else None
        consoles = (self._out, self._err)
        paths = (dest.stdouts, dest.stderrs)
        folder = os.path.dirname(dest.stdouts[local_rank])

        def go_live(name: str, console: Console, streams: tuple[int, ...]) -> bool:
            """Give `streams` one live channel to `console`; False where none can be made."""
            channel = open_channel(console, os.path.join(folder, f"{name}.fifo"))
            if channel is None:
                return False
            for index in streams:
                paths[index][local_rank] = channel.path
            reader = ChannelReader(f"ddprun-{name}", channel, Route(log, console, None))
            self._followers.append(reader.start())
            return True

        live = [show and prefix is None for show in shown]
        if all(live) and same_destination(*consoles) and go_live(f"rank{rank}", self._out, (0, 1)):
            return  # one channel: the two streams keep their relative order
        files = []
        for index, name in enumerate(("stdout", "stderr")):
            console = consoles[index] if shown[index] else None
            if console is not None and live[index] and go_live(f"{name}{rank}", console, (index,)):
                continue
            files.append((paths[index][local_rank], Route(log, console, prefix)))
        self._followers.append(FileFollower(f"ddprun-log{rank}", files).start())

    def close(self) -> None:
        """Copy what is left of the followed output, then stop. Call once workers are gone."""
        for follower in self._followers:
            follower.stop()
        for follower in self._followers:
            follower.join()
        for log in self._logs:
            log.close()
        self._followers.clear()
        self._logs.clear()


class RankLogsSpecs(DefaultLogsSpecs):
    """torch's default per-attempt layout, routed by a `RankLogMirror` at every attempt."""

    def __init__(self, log_dir: str, mirror: RankLogMirror) -> None:
        super().__init__(log_dir=log_dir, redirects=Std.ALL, tee=Std.NONE)
        self.mirror = mirror

    def reify(self, envs: dict[int, dict[str, str]]) -> LogsDest:
        """Build the attempt's file layout (torch), then route it (ddprun)."""
        self.mirror.close()  # the previous attempt's workers are gone; torch may wipe its dir
        dest = super().reify(envs)
        self.mirror.start_attempt(envs, dest)
        return dest
