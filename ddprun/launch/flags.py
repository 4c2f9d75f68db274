"""ddprun's flag table, torchrun's flags included: --help, the argv split, the raw values.

Every torchrun flag ddprun supports is accepted in both of torchrun's spellings
(``--nproc-per-node`` and ``--nproc_per_node``); ``--help`` lists the dashed one. ddprun's own
names stay (``--nproc`` is ``--nproc-per-node``, ``--logdir`` a log folder of its own). Each
flag's environment twin is ``DDPRUN_`` + its destination in capitals (``DDPRUN_NPROC``).

``--tee``/``-t`` takes torchrun's value (0-3, or per-local-rank ``0:3,1:1``) but may also be
given bare, ddprun's original switch, meaning 3 (every rank, both streams). The split between
launcher options and the script decides which: the token after ``--tee`` is its value only when
it reads as one (``3``, ``0:3,1:1``); anything else is the script. A script really named ``3``
is run as ``ddprun --tee -- 3`` or ``ddprun --tee ./3``. The twins DDPRUN_TEE and
DDPRUN_REDIRECTS take the same values (DDPRUN_TEE=1 is stdout only); true/yes/on mean 3.

`parse_args` returns each flag's raw text and where it came from; the parsers of the values
are in `values.py`, and `cpu_count` is what ``--nproc cpu`` counts. Errors name the spelling
the user typed (or the twin) and say what was expected, in one line. Nothing here imports
torch.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from ddprun.launch.values import ENV_PREFIX, UsageError, is_stream_spec, parse_bool, parse_streams

__all__ = ["FLAGS", "Flag", "cpu_count", "make_parser", "parse_args", "split_argv"]

START_METHODS = ("spawn", "fork", "forkserver")
RDZV_BACKENDS = ("c10d", "static")


@dataclass(frozen=True)
class Flag:
    """One launcher option: its spellings, where it lands, and how it is shown."""

    names: tuple[str, ...]  # shown in --help; the dashed long name is the canonical one
    dest: str
    help: str
    metavar: str | None = None  # None: a switch without a value
    const: str | None = None  # the value when given bare (the value is optional)

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()

    @property
    def aliases(self) -> tuple[str, ...]:
        """torchrun's underscore spellings of the multi-word long names (hidden in --help)."""
        return tuple(
            name.replace("-", "_").replace("__", "--", 1)
            for name in self.names
            if name.startswith("--") and "-" in name[2:]
        )

    @property
    def spellings(self) -> tuple[str, ...]:
        return self.names + self.aliases


FLAGS = (
    Flag(("--nproc", "--nproc-per-node"), "nproc",
         "workers on this node: N, auto (GPUs, or 2 without), cpu (one per core) or gpu", "N"),
    Flag(("--nnodes",), "nnodes", "number of nodes, N or MIN:MAX (elastic)", "N"),
    Flag(("--node-rank",), "node_rank", "this node's index, 0..nnodes-1", "R"),
    Flag(("--master-addr",), "master_addr", "address of node 0 (multi-node)", "ADDR"),
    Flag(("--master-port",), "master_port", "rendezvous port on node 0 (default: free)", "PORT"),
    Flag(("--rdzv-backend",), "rdzv_backend",
         "c10d (nodes ordered by the rendezvous) or static (by --node-rank)", "NAME"),
    Flag(("--rdzv-endpoint",), "rdzv_endpoint", "rendezvous HOST:PORT; port 0: a free one",
         "HOST:PORT"),
    Flag(("--rdzv-id",), "rdzv_id", "rendezvous id shared by all nodes; names the log dir", "ID"),
    Flag(("--rdzv-conf",), "rdzv_conf", "extra rendezvous settings KEY=VALUE,...", "CONF"),
    Flag(("--rdzv-timeout",), "rdzv_timeout", "seconds to wait for the nodes (default 900)", "S"),
    Flag(("--standalone",), "standalone", "one node, rendezvous on a free local port"),
    Flag(("--max-restarts",), "max_restarts", "restart all workers up to K times", "K"),
    Flag(("--monitor-interval",), "monitor_interval", "seconds between worker checks", "S"),
    Flag(("--start-method",), "start_method", "spawn, fork or forkserver (as torchrun: "
         "unused for scripts)", "M"),
    Flag(("--role",), "role", "workers' role name (ROLE_NAME)", "ROLE"),
    Flag(("-m", "--module"), "module", "run a module (python -m style) instead of a script"),
    Flag(("--no-python",), "no_python", "run the script as a program, not with python"),
    Flag(("--run-path",), "run_path", "run the script file with runpy.run_path (the default)"),
    Flag(("--logdir",), "logdir", "log directory (default ./ddprun_logs/<run id>)", "DIR"),
    Flag(("--log-dir",), "log_dir", "parent of the log directory: DIR/<run id>", "DIR"),
    Flag(("-r", "--redirects"), "redirects",
         "take streams off the console: 0-3 or per local rank 0:3,1:1", "STD"),
    Flag(("-t", "--tee"), "tee",
         "also show these ranks' streams, prefixed: 0-3, 0:3,1:1; bare: 3", "STD", const="3"),
    Flag(("--local-ranks-filter",), "local_ranks_filter",
         "console shows only these local ranks, e.g. 0,1", "RANKS"),
    Flag(("--local-addr",), "local_addr", "this node's address for the rendezvous", "ADDR"),
    Flag(("--backend",), "backend", "gloo or nccl, exported to workers as DDPRUN_BACKEND", "B"),
    Flag(("--shutdown-timeout",), "shutdown_timeout", "seconds from SIGTERM to SIGKILL", "S"),
)  # fmt: skip
_BY_NAME = {name: flag for flag in FLAGS for name in flag.spellings}


DIFFERENCES = """\
where ddprun differs from torchrun, on purpose:
  console            rank 0's output only (torchrun: every rank); -t/--tee adds ranks, prefixed
  --nproc default    auto = the visible GPUs, or 2 without one (torchrun: 1; its auto on a CPU
                     machine is one per core: ask for cpu)
  rendezvous port    one node: a free port, as --standalone (torchrun: --master-port, 29500);
                     several nodes: --master-port, default 29500
  OMP_NUM_THREADS    cores / workers on the node when unset (torchrun: 1)
  logs               always <logdir>/ranks/rank<N>.log; -r/--redirects only takes streams off
                     the console; --log-dir DIR puts them in DIR/<run id>
  node ranks         without --rdzv-backend a given --node-rank is kept as the group rank
  --no-python        the program runs without ddprun's worker wrapper (no error file, no
                     OMP default, not stopped when the launcher is SIGKILLed)
  environment        DDPRUN_* twins of the flags (torchrun's PET_* variables are not read)"""


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors become a `UsageError` (one line, no usage dump)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


class _Given(argparse.Action):
    """Store (value, the spelling used), so an error can name what the user typed."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option: Any = None) -> None:
        value = self.const if values is None or self.nargs == 0 else values
        setattr(namespace, self.dest, (value, option))


def make_parser(version: str) -> argparse.ArgumentParser:
    """The launcher's argparse parser (options only: the script is split off before)."""
    parser = _Parser(
        prog="ddprun",
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="ddprun [options] script.py [script args...]\n"
        "       ddprun [options] -m module [args...]\n"
        "       ddprun doctor [--rdzv-endpoint H:P | --master-addr A --master-port P]",
        description="Start one worker per process on this node through torch's elastic agent.\n"
        "torchrun's flags work too, in both spellings (--nproc-per-node, --nproc_per_node).\n"
        "'ddprun doctor' (first argument) checks versions, devices, network and an all-reduce.",
        epilog="Each option has an environment twin: --nproc <-> DDPRUN_NPROC, and so on.\n\n"
        + DIFFERENCES,
    )
    parser.add_argument("--version", action="version", version=f"ddprun {version}")
    for flag in FLAGS:
        kwargs: dict[str, Any] = {"dest": flag.dest, "action": _Given, "default": None}
        if flag.metavar is None:
            kwargs.update(nargs=0, const=True)
        elif flag.const is not None:
            kwargs.update(nargs="?", const=flag.const, metavar=flag.metavar)
        else:
            kwargs.update(metavar=flag.metavar)
        parser.add_argument(*flag.names, help=flag.help, **kwargs)
        if flag.aliases:
            parser.add_argument(*flag.aliases, help=argparse.SUPPRESS, **kwargs)
    return parser


def _takes_value(token: str, following: str | None) -> bool:
    flag = _BY_NAME.get(token)
    if flag is None or flag.metavar is None:
        return False  # a switch, an unknown option, or "--flag=value" with its value inline
    if flag.const is not None:  # optional value: only a token that reads as one
        return following is not None and is_stream_spec(following)
    return True


def split_argv(argv: Sequence[str]) -> tuple[list[str], str | None, list[str]]:
    """Split argv into (launcher options, script, script args) at the first non-option.

    argparse's REMAINDER drops a ``--`` that belongs to the script, so the split is done here:
    everything after the script is the script's, byte for byte.
    """
    index = 0
    while index < len(argv):
        token = argv[index]
        if token == "--":
            index += 1
            break
        if not token.startswith("-") or token == "-":
            break
        following = argv[index + 1] if index + 1 < len(argv) else None
        index += 2 if _takes_value(token, following) else 1
    if index >= len(argv):
        return list(argv), None, []
    launcher = [token for token in argv[:index] if token != "--"]
    return launcher, argv[index], list(argv[index + 1 :])


def check_tee_value(launcher_argv: Sequence[str], script: str | None) -> None:
    """``--tee 9``: a "script" that is a mistyped tee value gets the --tee error, not
    "script not found" (a real file of that name still runs)."""
    flag = launcher_argv[-1] if launcher_argv else None
    if (
        flag in _BY_NAME
        and _BY_NAME[flag].const is not None
        and script
        and re.fullmatch(r"[\d:,]+", script)
        and not os.path.exists(script)
    ):
        parse_streams(script, flag)


def parse_args(
    launcher_argv: Sequence[str], env: Mapping[str, str], version: str
) -> dict[str, tuple[Any, str]]:
    """Each flag's raw value and where it came from: the flag as typed, else its DDPRUN_*
    twin (switches parsed as booleans there), else (None, canonical spelling)."""
    namespace = make_parser(version).parse_args(list(launcher_argv))
    values: dict[str, tuple[Any, str]] = {}
    for flag in FLAGS:
        given = getattr(namespace, flag.dest)
        if given is not None:
            values[flag.dest] = given
        elif flag.env in env:
            text = env[flag.env]
            values[flag.dest] = (parse_bool(text, flag.env) if flag.metavar is None else text,
                                 flag.env)  # fmt: skip
        else:
            values[flag.dest] = (None, flag.names[-1])
    return values


def cpu_count() -> int:
    """Cores this process may run on (as torchrun's ``--nproc-per-node cpu``)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
