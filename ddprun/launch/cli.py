"""``ddprun`` command line: parse, validate, resolve defaults -> one `LaunchSettings`.

Every flag has an environment twin (``--nproc`` <-> ``DDPRUN_NPROC``). Precedence, highest
first: the flag, its twin, the cluster scheduler (SLURM, see `cluster.py`), the default declared
on `LaunchSettings`. Everything after the script (or after ``-m module``) belongs to the script
and is passed on untouched, even when it looks like a ddprun flag.

This module imports neither torch nor the agent at import time, so ``ddprun --help`` is fast.
Invalid arguments exit with status 2 and one line saying what was wrong and what was expected.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NoReturn

from ddprun import __version__
from ddprun.launch.cluster import ClusterError, ClusterInfo, detect_cluster

__all__ = ["LaunchSettings", "Rendezvous", "UsageError", "build_settings", "main", "split_argv"]

_ENV_PREFIX = "DDPRUN_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_RUN_ID = re.compile(r"^[A-Za-z0-9_.\-]+$")

#: ddprun's rendezvous backend: torch's c10d with a fresh worker store per round (agent.py).
RDZV_BACKEND = "ddprun-c10d"
#: Rendezvous id of multi-node runs given none (and not under SLURM).
SHARED_RUN_ID = "ddprun"
#: rdzv_configs key carrying this node's fixed rank to ddprun's rendezvous (agent.py).
NODE_RANK_CONFIG = "ddprun_node_rank"


class UsageError(ValueError):
    """An invalid argument; the message is the one line shown to the user."""


@dataclass(frozen=True)
class Rendezvous:
    """How this node's agent meets the others (torch rendezvous parameters)."""

    backend: str
    endpoint: str
    configs: dict[str, Any]
    local_addr: str | None


@dataclass(frozen=True)
class LaunchSettings:
    """Every setting of one launch. These defaults are ddprun's only defaults.

    `build_settings` returns an instance with everything resolved: `nproc` is an int,
    `run_id` and `logdir` are filled in.
    """

    entrypoint: str = ""  # the script's path, or the module's name with is_module
    is_module: bool = False
    script_args: tuple[str, ...] = ()
    nproc: int | Literal["auto"] = "auto"
    min_nodes: int = 1
    max_nodes: int = 1
    node_rank: int = 0
    node_rank_given: bool = False  # from --node-rank, its twin or the scheduler
    master_addr: str = "127.0.0.1"
    master_port: int | None = None  # None on one node: the store binds a free port itself
    rdzv_endpoint: str | None = None
    run_id: str = ""  # rendezvous id; "" = generated (one node) or SLURM job id
    max_restarts: int = 0
    logdir: str = ""  # "" = ./ddprun_logs/<run id>
    tee: bool = False
    backend: str | None = None  # exported to workers as DDPRUN_BACKEND
    shutdown_timeout: int = 30  # seconds between forwarding SIGTERM and SIGKILL
    monitor_interval: float = 0.1
    rdzv_timeout: int = 900  # seconds to wait for the nodes to join a round (each restart too)
    start_method: str = "spawn"
    role: str = "default"
    signals_to_handle: str = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"  # forwarded to workers
    default_master_port: int = 29500  # multi-node rendezvous port when none is given

    @property
    def is_single_node(self) -> bool:
        return self.max_nodes == 1

    @property
    def fixed_node_rank(self) -> int | None:
        """The group rank this node must get, or None when the rendezvous may choose.

        A fixed-size multi-node job whose node rank was given (or taken from SLURM) keeps it:
        GROUP_RANK == node rank, so node 0's local rank 0 is global rank 0. Elastic jobs
        (MIN:MAX) and jobs without a node rank let the rendezvous order the nodes.
        """
        fixed = self.node_rank_given and self.min_nodes == self.max_nodes > 1
        return self.node_rank if fixed else None

    def rendezvous(self) -> Rendezvous:
        """Where and how this node's agent meets the others (always torch's c10d rendezvous).

        One node with no port given: the agent's store binds 127.0.0.1:0, a free port chosen by
        the OS at bind time, so concurrent jobs never collide and restarts keep that store.
        Otherwise the store listens on the endpoint (--rdzv-endpoint, or master addr:port) and
        the node with node rank 0 hosts it; nodes keep their given node rank as group rank
        (`fixed_node_rank`), else the rendezvous orders them.
        """
        configs: dict[str, Any] = {"timeout": self.rdzv_timeout, "join_timeout": self.rdzv_timeout}
        if self.fixed_node_rank is not None:
            configs[NODE_RANK_CONFIG] = self.fixed_node_rank
        if self.rdzv_endpoint:
            if self.is_single_node:
                configs["is_host"] = True
            return Rendezvous(RDZV_BACKEND, self.rdzv_endpoint, configs, None)
        if self.is_single_node and self.master_port is None:
            return Rendezvous(
                RDZV_BACKEND, "127.0.0.1:0", {**configs, "is_host": True}, "127.0.0.1"
            )
        port = self.master_port if self.master_port is not None else self.default_master_port
        endpoint = _join_endpoint(self.master_addr, port)
        return Rendezvous(RDZV_BACKEND, endpoint, {**configs, "is_host": self.node_rank == 0}, None)


@dataclass(frozen=True)
class _Flag:
    names: tuple[str, ...]
    dest: str
    help: str
    metavar: str | None = None  # None: a switch without a value

    @property
    def env(self) -> str:
        return _ENV_PREFIX + self.dest.upper()


_FLAGS = (
    _Flag(("--nproc",), "nproc", "workers on this node: N or 'auto' (GPUs, or 2 without)", "N"),
    _Flag(("--nnodes",), "nnodes", "number of nodes, N or MIN:MAX (elastic)", "N"),
    _Flag(("--node-rank",), "node_rank", "this node's index, 0..nnodes-1", "R"),
    _Flag(("--master-addr",), "master_addr", "address of node 0 (multi-node)", "ADDR"),
    _Flag(("--master-port",), "master_port", "rendezvous port on node 0 (default: free)", "PORT"),
    _Flag(("--rdzv-endpoint",), "rdzv_endpoint", "c10d rendezvous HOST:PORT", "HOST:PORT"),
    _Flag(("--rdzv-id",), "rdzv_id", "rendezvous id shared by all nodes; names the log dir", "ID"),
    _Flag(("--rdzv-timeout",), "rdzv_timeout", "seconds to wait for the nodes (default 900)", "S"),
    _Flag(("--max-restarts",), "max_restarts", "restart all workers up to K times", "K"),
    _Flag(("--logdir",), "logdir", "log directory (default ./ddprun_logs/<run id>)", "DIR"),
    _Flag(("--tee",), "tee", "also show every rank's output on the console, prefixed"),
    _Flag(("--backend",), "backend", "gloo or nccl, exported to workers as DDPRUN_BACKEND", "B"),
    _Flag(("--shutdown-timeout",), "shutdown_timeout", "seconds from SIGTERM to SIGKILL", "S"),
    _Flag(("-m", "--module"), "module", "run a module (python -m style) instead of a script"),
)
_VALUE_FLAGS = {name for flag in _FLAGS if flag.metavar for name in flag.names}


def _default(name: str) -> Any:
    return LaunchSettings.__dataclass_fields__[name].default


def _join_endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors become a `UsageError` (one line, no usage dump)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _make_parser() -> _Parser:
    parser = _Parser(
        prog="ddprun",
        allow_abbrev=False,
        usage="ddprun [options] script.py [script args...]\n       ddprun [options] -m module [args...]",
        description="Start one worker per process on this node through torch's elastic agent.",
        epilog="Each option has an environment twin: --nproc <-> DDPRUN_NPROC, and so on.",
    )
    parser.add_argument("--version", action="version", version=f"ddprun {__version__}")
    for flag in _FLAGS:
        if flag.metavar:
            parser.add_argument(*flag.names, dest=flag.dest, metavar=flag.metavar, help=flag.help)
        else:
            parser.add_argument(*flag.names, dest=flag.dest, action="store_true", default=None,
                                help=flag.help)  # fmt: skip
    return parser


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
        takes_value = token in _VALUE_FLAGS  # "--flag=value" carries its value inline
        index += 2 if takes_value else 1
    if index >= len(argv):
        return list(argv), None, []
    launcher = [token for token in argv[:index] if token != "--"]
    return launcher, argv[index], list(argv[index + 1 :])


def _raw_values(namespace: argparse.Namespace, env: Mapping[str, str]) -> dict[str, Any]:
    """Each flag's value: from the command line, else from its DDPRUN_* twin, else None."""
    values: dict[str, Any] = {}
    for flag in _FLAGS:
        value = getattr(namespace, flag.dest)
        source = flag.names[-1]
        if value is None and flag.env in env:
            value, source = env[flag.env], flag.env
            if not flag.metavar:
                value = _parse_bool(value, source)
        values[flag.dest] = (value, source)
    return values


def _parse_bool(text: str, source: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE or lowered in _FALSE:
        return lowered in _TRUE
    raise UsageError(f"{source} must be 1/0/true/false, got {text!r}")


def _parse_int(text: str, source: str, low: int, high: int | None, expected: str) -> int:
    try:
        number = int(str(text).strip())
    except ValueError:
        raise UsageError(f"{source} must be {expected}, got {text!r}") from None
    if number < low or (high is not None and number > high):
        raise UsageError(f"{source} must be {expected}, got {text!r}")
    return number


def _parse_nproc(text: str, source: str) -> int | Literal["auto"]:
    if str(text).strip().lower() == "auto":
        return "auto"
    return _parse_int(text, source, 1, None, "a positive integer or 'auto'")


def _parse_nnodes(text: str, source: str) -> tuple[int, int]:
    expected = "N or MIN:MAX with 1 <= MIN <= MAX"
    parts = str(text).split(":")
    if len(parts) > 2:
        raise UsageError(f"{source} must be {expected}, got {text!r}")
    low = _parse_int(parts[0], source, 1, None, expected)
    high = _parse_int(parts[-1], source, 1, None, expected)
    if low > high:
        raise UsageError(f"{source} must be {expected}, got {text!r}")
    return low, high


def _parse_port(text: str, source: str) -> int:
    return _parse_int(text, source, 1, 65535, "a port number in 1..65535")


def _parse_endpoint(text: str, source: str) -> str:
    host, _, port = str(text).rpartition(":")
    if not host.strip("[]") or not port:
        raise UsageError(f"{source} must be HOST:PORT, got {text!r}")
    _parse_port(port, source)
    return str(text)


def _parse_backend(text: str, source: str) -> str:
    if text not in ("gloo", "nccl"):
        raise UsageError(f"{source} must be 'gloo' or 'nccl', got {text!r}")
    return text


def _parse_run_id(text: str, source: str) -> str:
    if not _RUN_ID.match(text):
        raise UsageError(f"{source} must be letters, digits, '.', '_' or '-', got {text!r}")
    return text


def _visible_gpus() -> int:
    import torch  # only `--nproc auto` needs it; the agent imports torch right after anyway

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _resolve_nproc(value: int | Literal["auto"]) -> int:
    return value if isinstance(value, int) else (_visible_gpus() or 2)


def _generated_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


def _check_entrypoint(script: str | None, is_module: bool) -> str:
    if not script:
        raise UsageError(
            "missing the script to run (expected: ddprun [options] script.py [args...] "
            "or ddprun [options] -m module [args...])"
        )
    if is_module:
        if not all(part.isidentifier() for part in script.split(".")):
            raise UsageError(f"-m expects a dotted module name, got {script!r}")
    elif not os.path.isfile(script):
        raise UsageError(
            f"script not found: {script!r} (expected a Python file; use -m for a module)"
        )
    return script


def _nodes(raw: dict[str, Any], cluster: ClusterInfo | None) -> tuple[int, int, int, bool]:
    """Resolve (min_nodes, max_nodes, node_rank, node_rank_given) from flags/twins, then the
    cluster."""
    nnodes_text, source = raw["nnodes"]
    if nnodes_text is not None:
        min_nodes, max_nodes = _parse_nnodes(nnodes_text, source)
    elif cluster is not None:
        min_nodes = max_nodes = cluster.nnodes
    else:
        min_nodes, max_nodes = _default("min_nodes"), _default("max_nodes")
    rank_text, source = raw["node_rank"]
    given = True
    if rank_text is not None:
        node_rank = _parse_int(
            rank_text, source, 0, max_nodes - 1, f"an integer in 0..{max_nodes - 1}"
        )
    elif cluster is not None and cluster.nnodes == max_nodes:
        node_rank = cluster.node_rank  # only meaningful for the scheduler's own node count
    else:
        node_rank, given = _default("node_rank"), False
    if node_rank >= max_nodes:
        raise UsageError(
            f"node rank {node_rank} is outside 0..{max_nodes - 1} for --nnodes {max_nodes}"
        )
    return min_nodes, max_nodes, node_rank, given


def _master(
    raw: dict[str, Any], cluster: ClusterInfo | None, multi_node: bool
) -> tuple[str, int | None]:
    """Resolve (master_addr, master_port); the cluster's only matter for multi-node runs."""
    addr, source = raw["master_addr"]
    if addr is not None and not str(addr).strip():
        raise UsageError(f"{source} must be a host name or address, got an empty string")
    port_text, port_source = raw["master_port"]
    port = _parse_port(port_text, port_source) if port_text is not None else None
    if multi_node and cluster is not None:
        addr = addr if addr is not None else cluster.master_addr
        port = port if port is not None else cluster.master_port
    return (addr if addr is not None else _default("master_addr")), port


def _optional(raw: dict[str, Any], name: str, parse: Any, default: Any) -> Any:
    value, source = raw[name]
    return default if value is None else parse(value, source)


def _run_id(raw: dict[str, Any], cluster: ClusterInfo | None, multi_node: bool) -> str:
    """The rendezvous id: given, else SLURM's job id, else one every node can agree on."""
    given = _optional(raw, "rdzv_id", _parse_run_id, None)
    if given:
        return given
    if cluster is not None:
        return _parse_run_id(cluster.job_id, "SLURM_JOB_ID")
    # Nodes cannot agree on a random id, so several nodes share a fixed one (torchrun: "none").
    return SHARED_RUN_ID if multi_node else _generated_run_id()


def _logdir(raw: dict[str, Any], run_id: str) -> str:
    given = _optional(raw, "logdir", lambda value, _: value, "")
    # The fixed multi-node id would make every run append to the same folder.
    name = _generated_run_id() if run_id == SHARED_RUN_ID else run_id
    return os.path.abspath(given or os.path.join("ddprun_logs", name))


def _detect(env: Mapping[str, str]) -> ClusterInfo | None:
    try:
        return detect_cluster(env)
    except ClusterError as exc:
        raise UsageError(str(exc)) from None


def build_settings(argv: Sequence[str], env: Mapping[str, str]) -> LaunchSettings:
    """Turn a command line and an environment into fully resolved settings.

    Args:
        argv: the arguments after the program name.
        env: the environment (flag twins and scheduler variables are read from it).

    Returns:
        Settings with every value resolved.

    Raises:
        UsageError: an argument or variable is invalid.
    """
    launcher_argv, script, script_args = split_argv(argv)
    raw = _raw_values(_make_parser().parse_args(launcher_argv), env)
    is_module = bool(raw["module"][0])
    entrypoint = _check_entrypoint(script, is_module)
    cluster = _detect(env)
    min_nodes, max_nodes, node_rank, node_rank_given = _nodes(raw, cluster)
    master_addr, master_port = _master(raw, cluster, multi_node=max_nodes > 1)
    run_id = _run_id(raw, cluster, multi_node=max_nodes > 1)
    return LaunchSettings(
        entrypoint=entrypoint,
        is_module=is_module,
        script_args=tuple(script_args),
        nproc=_resolve_nproc(_optional(raw, "nproc", _parse_nproc, _default("nproc"))),
        min_nodes=min_nodes,
        max_nodes=max_nodes,
        node_rank=node_rank,
        node_rank_given=node_rank_given,
        master_addr=master_addr,
        master_port=master_port,
        rdzv_endpoint=_optional(raw, "rdzv_endpoint", _parse_endpoint, _default("rdzv_endpoint")),
        run_id=run_id,
        rdzv_timeout=_optional(raw, "rdzv_timeout", _positive, _default("rdzv_timeout")),
        max_restarts=_optional(raw, "max_restarts", _nonnegative, _default("max_restarts")),
        logdir=_logdir(raw, run_id),
        tee=bool(raw["tee"][0]),
        backend=_optional(raw, "backend", _parse_backend, _default("backend")),
        shutdown_timeout=_optional(
            raw, "shutdown_timeout", _nonnegative, _default("shutdown_timeout")
        ),
    )


def _nonnegative(text: str, source: str) -> int:
    return _parse_int(text, source, 0, None, "an integer >= 0")


def _positive(text: str, source: str) -> int:
    return _parse_int(text, source, 1, None, "an integer >= 1")


_CPP_LOG_LEVEL = "TORCH_CPP_LOG_LEVEL"


def _quiet_torch_cpp_warnings() -> bool:
    """Keep torch's C++ warnings out of the launcher (not the workers), unless asked for.

    When a node dies, the agent's store client logs each failed heartbeat with a C++ stack
    trace; the launcher's own one-line message says what happened. DDPRUN_LOG_LEVEL or an
    explicit TORCH_CPP_LOG_LEVEL keeps them. Returns True if the variable was set here.
    """
    if _CPP_LOG_LEVEL in os.environ or os.environ.get("DDPRUN_LOG_LEVEL"):
        return False
    os.environ[_CPP_LOG_LEVEL] = "ERROR"
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``ddprun``; return the process exit status.

    Returns:
        0 on success, 1 if a worker failed, 2 on invalid arguments, 128+N after signal N.
    """
    quiet = _quiet_torch_cpp_warnings()
    try:
        settings = build_settings(sys.argv[1:] if argv is None else argv, os.environ)
        from ddprun.launch.agent import launch  # imports torch: only once the arguments are valid
    except UsageError as exc:
        print(f"ddprun: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if quiet:  # read once, when torch is imported; the workers get the user's environment
            del os.environ[_CPP_LOG_LEVEL]

    status = launch(settings)
    if argv is None:
        # The command itself: every worker is gone and every log written, so skip interpreter
        # finalization, which takes ~0.5 s with torch loaded and has nothing left to save.
        from ddprun.distributed import exit_process

        exit_process(status)
    return status
