"""ddprun's flag table, torchrun's flags included, and the parsers of their values.

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

Errors name the spelling the user typed (or the twin) and say what was expected, in one line.
Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

__all__ = ["FLAGS", "Flag", "StreamSpec", "UsageError", "parse_args", "split_argv"]

ENV_PREFIX = "DDPRUN_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_RUN_ID = re.compile(r"^[A-Za-z0-9_.\-]+$")
# torchrun's Std values: one code for every local rank, or "local_rank:code" pairs.
_STD_VALUE = re.compile(r"^[0-3]$")
_STD_MAP = re.compile(r"^\d+:[0-3](,\d+:[0-3])*$")
#: rdzv-conf keys torch's c10d rendezvous reads as integers (seconds or counts).
_INT_CONF_KEYS = frozenset(
    "timeout join_timeout last_call_timeout close_timeout heartbeat_timeout read_timeout "
    "keep_alive_interval keep_alive_max_attempt".split()
)
START_METHODS = ("spawn", "fork", "forkserver")
RDZV_BACKENDS = ("c10d", "static")


class UsageError(ValueError):
    """An invalid argument; the message is the one line shown to the user."""


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


# ---- value parsers: (text, source) -> value, or UsageError naming the source ----


def parse_bool(text: str, source: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE or lowered in _FALSE:
        return lowered in _TRUE
    raise UsageError(f"{source} must be 1/0/true/false, got {text!r}")


def parse_int(text: Any, source: str, low: int, high: int | None, expected: str) -> int:
    try:
        number = int(str(text).strip())
    except ValueError:
        raise UsageError(f"{source} must be {expected}, got {text!r}") from None
    if number < low or (high is not None and number > high):
        raise UsageError(f"{source} must be {expected}, got {text!r}")
    return number


def nonnegative(text: str, source: str) -> int:
    return parse_int(text, source, 0, None, "an integer >= 0")


def positive(text: str, source: str) -> int:
    return parse_int(text, source, 1, None, "an integer >= 1")


def positive_seconds(text: str, source: str) -> float:
    try:
        seconds = float(str(text).strip())
    except ValueError:
        seconds = -1.0
    if not seconds > 0 or seconds == float("inf"):
        raise UsageError(f"{source} must be a number of seconds > 0, got {text!r}")
    return seconds


def parse_nproc(text: str, source: str) -> int | str:
    """A positive count, or torchrun's words auto/cpu/gpu (resolved by the caller)."""
    word = str(text).strip().lower()
    if word in ("auto", "cpu", "gpu"):
        return word
    return parse_int(text, source, 1, None, "a positive integer, 'auto', 'cpu' or 'gpu'")


def parse_nnodes(text: str, source: str) -> tuple[int, int]:
    expected = "N or MIN:MAX with 1 <= MIN <= MAX"
    parts = str(text).split(":")
    if len(parts) > 2:
        raise UsageError(f"{source} must be {expected}, got {text!r}")
    low = parse_int(parts[0], source, 1, None, expected)
    high = parse_int(parts[-1], source, 1, None, expected)
    if low > high:
        raise UsageError(f"{source} must be {expected}, got {text!r}")
    return low, high


def parse_port(text: str, source: str) -> int:
    return parse_int(text, source, 1, 65535, "a port number in 1..65535")


def parse_endpoint(text: str, source: str) -> str:
    """HOST:PORT (IPv6 as [::1]:PORT); port 0 asks for a free port (one node only)."""
    host, _, port = str(text).rpartition(":")
    if not host.strip("[]") or not port:
        raise UsageError(f"{source} must be HOST:PORT, got {text!r}")
    parse_int(port, source, 0, 65535, "HOST:PORT with a port in 0..65535 (0: a free one)")
    return str(text)


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def endpoint_port(endpoint: str) -> int:
    return int(endpoint.rpartition(":")[2])


def parse_backend(text: str, source: str) -> str:
    if text not in ("gloo", "nccl"):
        raise UsageError(f"{source} must be 'gloo' or 'nccl', got {text!r}")
    return text


def parse_choice(choices: Sequence[str]) -> Any:
    def parse(text: str, source: str) -> str:
        if text not in choices:
            names = ", ".join(repr(choice) for choice in choices)
            raise UsageError(f"{source} must be one of {names}, got {text!r}")
        return text

    return parse


def parse_run_id(text: str, source: str) -> str:
    if not _RUN_ID.match(text):
        raise UsageError(f"{source} must be letters, digits, '.', '_' or '-', got {text!r}")
    return text


def parse_text(text: str, source: str) -> str:
    if not str(text).strip():
        raise UsageError(f"{source} must not be empty")
    return str(text).strip()


def parse_rdzv_conf(text: str, source: str) -> dict[str, str]:
    """torchrun's KEY=VALUE,... rendezvous settings; integer keys are checked here."""
    conf: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in str(text).split(","))):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not key or not sep or not value:
            raise UsageError(f"{source} must be KEY=VALUE[,KEY=VALUE...], got {text!r}")
        if key in _INT_CONF_KEYS:
            parse_int(value, f"{source} {key}", 1, None, "an integer >= 1")
        if key == "is_host":
            parse_bool(value, f"{source} is_host")
        conf[key] = value
    return conf


def parse_ranks(text: str, source: str) -> tuple[int, ...]:
    expected = "comma-separated local ranks like 0,1"
    parts = [part.strip() for part in str(text).split(",")]
    if not all(part.isdigit() for part in parts):
        raise UsageError(f"{source} must be {expected}, got {text!r}")
    return tuple(sorted({int(part) for part in parts}))


def is_stream_spec(text: str) -> bool:
    return bool(_STD_VALUE.match(text) or _STD_MAP.match(text))


@dataclass(frozen=True)
class StreamSpec:
    """torchrun's Std value for --redirects/--tee: 0 none, 1 stdout, 2 stderr, 3 both, for
    every local rank (`default`) or per local rank (`per_rank`; ranks not listed: 0)."""

    default: int = 0
    per_rank: tuple[tuple[int, int], ...] = ()

    def of(self, local_rank: int) -> int:
        """The streams (bit 1 stdout, bit 2 stderr) chosen for `local_rank`."""
        return dict(self.per_rank).get(local_rank, self.default)

    def __bool__(self) -> bool:
        return bool(self.default) or any(code for _, code in self.per_rank)


def parse_streams(text: Any, source: str) -> StreamSpec:
    """0-3 or ``local_rank:code,...``; the twin may also say true/false (3/0)."""
    value = str(text).strip()
    if source.startswith(ENV_PREFIX) and not value.isdigit() and ":" not in value:
        value = "3" if parse_bool(value, source) else "0"
    if _STD_VALUE.match(value):
        return StreamSpec(int(value))
    if _STD_MAP.match(value):
        pairs = (item.split(":") for item in value.split(","))
        return StreamSpec(0, tuple(sorted((int(rank), int(code)) for rank, code in pairs)))
    raise UsageError(
        f"{source} must be 0-3 (0 none, 1 stdout, 2 stderr, 3 both) or per local rank like "
        f"0:3,1:1, got {text!r}"
    )


def cpu_count() -> int:
    """Cores this process may run on (as torchrun's ``--nproc-per-node cpu``)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
