"""``ddprun`` command line: parse, validate, resolve defaults -> one `LaunchSettings`.

The flags (ddprun's own names and torchrun's, in both spellings) and their value parsers live
in `flags.py`; this module resolves them. Every flag has an environment twin (``--nproc`` <->
``DDPRUN_NPROC``). Precedence, highest first: the flag, its twin, the cluster scheduler (SLURM,
see `cluster.py`), the default declared on `LaunchSettings`. Everything after the script (or
after ``-m module``) belongs to the script and is passed on untouched, even when it looks like
a ddprun flag.

``ddprun doctor`` is a subcommand only as the very first argument (`doctor.py`); a script
named ``doctor`` runs as ``ddprun ./doctor`` or ``ddprun -- doctor``.

This module imports neither torch nor the agent at import time, so ``ddprun --help`` is fast.
Invalid arguments exit with status 2 and one line saying what was wrong and what was expected.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ddprun import __version__
from ddprun.launch import flags as fl
from ddprun.launch.cluster import ClusterError, ClusterInfo, detect_cluster
from ddprun.launch.flags import StreamSpec, UsageError, split_argv

__all__ = ["LaunchSettings", "Rendezvous", "UsageError", "build_settings", "main", "split_argv"]

#: ddprun's rendezvous backend: torch's c10d with a fresh worker store per round (agent.py).
RDZV_BACKEND = "ddprun-c10d"
#: Rendezvous id of multi-node runs given none (and not under SLURM).
SHARED_RUN_ID = "ddprun"
#: rdzv_configs key carrying this node's fixed rank to ddprun's rendezvous (agent.py).
NODE_RANK_CONFIG = "ddprun_node_rank"


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
    nproc: int | str = "auto"  # or "cpu" / "gpu" (torchrun's words); an int once resolved
    min_nodes: int = 1
    max_nodes: int = 1
    node_rank: int = 0
    node_rank_given: bool = False  # from --node-rank, its twin or the scheduler
    master_addr: str = "127.0.0.1"
    master_port: int | None = None  # None on one node: the store binds a free port itself
    rdzv_endpoint: str | None = None
    rdzv_backend: str | None = None  # c10d/static as asked; None: keep a given node rank
    rdzv_conf: tuple[tuple[str, str], ...] = ()  # --rdzv-conf, passed to the rendezvous
    local_addr: str | None = None  # this node's address (workers' MASTER_ADDR on node 0)
    run_id: str = ""  # rendezvous id; "" = generated (one node) or SLURM job id
    max_restarts: int = 0
    logdir: str = ""  # "" = ./ddprun_logs/<run id>
    tee: StreamSpec = StreamSpec()  # ranks/streams also on the console, prefixed
    redirects: StreamSpec = StreamSpec()  # streams taken off the console (files keep them)
    local_ranks_filter: tuple[int, ...] | None = None  # console: only these local ranks
    no_python: bool = False  # run the entrypoint as a program, without the worker wrapper
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
        With ``--rdzv-backend static`` the node rank (default 0) is always kept; with
        ``c10d`` the rendezvous always orders the nodes (torchrun ignores --node-rank there).
        """
        if self.rdzv_backend == "c10d":
            return None
        given = self.node_rank_given or self.rdzv_backend == "static"
        fixed = given and self.min_nodes == self.max_nodes > 1
        return self.node_rank if fixed else None

    def console_streams(self, rank: int, local_rank: int) -> tuple[bool, bool]:
        """Whether this worker's (stdout, stderr) reach the launcher's console.

        Rank 0's streams do unless redirected (``-r``); another rank's only when tee'd
        (``-t``); a tee'd stream shows even if redirected (torchrun: tee = redirect + console).
        ``--local-ranks-filter`` then keeps only the listed local ranks. Every rank's streams
        always reach its rank<N>.log.
        """
        if self.local_ranks_filter is not None and local_rank not in self.local_ranks_filter:
            return False, False
        shown = ((3 if rank == 0 else 0) & ~self.redirects.of(local_rank)) | self.tee.of(local_rank)
        return bool(shown & 1), bool(shown & 2)

    def rendezvous(self) -> Rendezvous:
        """Where and how this node's agent meets the others (always torch's c10d rendezvous).

        One node with no port given: the agent's store binds 127.0.0.1:0, a free port chosen by
        the OS at bind time, so concurrent jobs never collide and restarts keep that store.
        Otherwise the store listens on the endpoint (--rdzv-endpoint, or master addr:port) and
        the node with node rank 0 hosts it; nodes keep their given node rank as group rank
        (`fixed_node_rank`), else the rendezvous orders them. ``--rdzv-conf`` settings are
        passed on and win over these; ``--local-addr`` is this node's address.
        """
        timeout = self.rdzv_timeout
        configs: dict[str, Any] = {
            "timeout": timeout,
            "join_timeout": timeout,
            **dict(self.rdzv_conf),
        }
        if self.fixed_node_rank is not None:
            configs[NODE_RANK_CONFIG] = self.fixed_node_rank
        if self.rdzv_endpoint:
            if self.is_single_node or self.rdzv_backend == "static":
                configs.setdefault("is_host", self.node_rank == 0)
            return Rendezvous(RDZV_BACKEND, self.rdzv_endpoint, configs, self.local_addr)
        if self.is_single_node and self.master_port is None:
            configs.setdefault("is_host", True)
            local_addr = self.local_addr or "127.0.0.1"
            return Rendezvous(RDZV_BACKEND, "127.0.0.1:0", configs, local_addr)
        port = self.master_port if self.master_port is not None else self.default_master_port
        endpoint = fl.join_host_port(self.master_addr, port)
        configs.setdefault("is_host", self.node_rank == 0)
        return Rendezvous(RDZV_BACKEND, endpoint, configs, self.local_addr)


def _default(name: str) -> Any:
    return LaunchSettings.__dataclass_fields__[name].default


def _visible_gpus() -> int:
    import torch  # only `--nproc auto/gpu` needs it; the agent imports torch right after anyway

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _resolve_nproc(value: int | str, source: str) -> int:
    """auto: the visible GPUs, or 2 without one; cpu: one per core; gpu: the GPUs (required)."""
    if isinstance(value, int):
        return value
    if value == "cpu":
        return fl.cpu_count()
    gpus = _visible_gpus()
    if value == "gpu" and not gpus:
        raise UsageError(f"{source} gpu needs a visible CUDA GPU and there is none "
                         "(expected a number, 'auto' or 'cpu' here)")  # fmt: skip
    return gpus or 2


def _generated_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


def _check_entrypoint(script: str | None, is_module: bool, no_python: bool) -> str:
    if not script:
        raise UsageError(
            "missing the script to run (expected: ddprun [options] script.py [args...] "
            "or ddprun [options] -m module [args...])"
        )
    if is_module:
        if not all(part.isidentifier() for part in script.split(".")):
            raise UsageError(f"-m expects a dotted module name, got {script!r}")
    elif no_python:
        if shutil.which(script) is None:
            raise UsageError(f"program not found: {script!r} (--no-python runs it directly: "
                             "expected an executable file or a command on PATH)")  # fmt: skip
    elif not os.path.isfile(script):
        raise UsageError(
            f"script not found: {script!r} (expected a Python file; use -m for a module)"
        )
    return script


def _program_mode(raw: dict[str, Any]) -> tuple[bool, bool]:
    """Resolve (is_module, no_python). --run-path runs a file with runpy.run_path, which is
    what the worker wrapper does anyway; as in torchrun it overrides --no-python."""
    is_module, no_python, run_path = (
        bool(raw[name][0]) for name in ("module", "no_python", "run_path")
    )
    if run_path and is_module:
        raise UsageError(f"{raw['run_path'][1]} runs a file and cannot be combined with -m")
    if run_path:
        return False, False
    if no_python and is_module:
        raise UsageError(f"{raw['no_python'][1]} runs a program and cannot be combined with -m")
    return is_module, no_python


def _nodes(raw: dict[str, Any], cluster: ClusterInfo | None) -> tuple[int, int, int, bool]:
    """Resolve (min_nodes, max_nodes, node_rank, node_rank_given) from flags/twins, then the
    cluster."""
    nnodes_text, source = raw["nnodes"]
    if nnodes_text is not None:
        min_nodes, max_nodes = fl.parse_nnodes(nnodes_text, source)
    elif cluster is not None:
        min_nodes = max_nodes = cluster.nnodes
    else:
        min_nodes, max_nodes = _default("min_nodes"), _default("max_nodes")
    rank_text, source = raw["node_rank"]
    given = True
    if rank_text is not None:
        expected = f"an integer in 0..{max_nodes - 1}"
        node_rank = fl.parse_int(rank_text, source, 0, max_nodes - 1, expected)
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
    port = fl.parse_port(port_text, port_source) if port_text is not None else None
    if multi_node and cluster is not None:
        addr = addr if addr is not None else cluster.master_addr
        port = port if port is not None else cluster.master_port
    return (addr if addr is not None else _default("master_addr")), port


def _optional(raw: dict[str, Any], name: str, parse: Any, default: Any) -> Any:
    value, source = raw[name]
    return default if value is None else parse(value, source)


def _run_id(raw: dict[str, Any], cluster: ClusterInfo | None, multi_node: bool) -> str:
    """The rendezvous id: given, else SLURM's job id, else one every node can agree on."""
    given = _optional(raw, "rdzv_id", fl.parse_run_id, None)
    if given:
        return given
    if cluster is not None:
        return fl.parse_run_id(cluster.job_id, "SLURM_JOB_ID")
    # Nodes cannot agree on a random id, so several nodes share a fixed one (torchrun: "none").
    return SHARED_RUN_ID if multi_node else _generated_run_id()


def _logdir(raw: dict[str, Any], run_id: str) -> str:
    """--logdir DIR is the folder itself; torchrun's --log-dir DIR a parent: DIR/<run id>."""
    logdir = _optional(raw, "logdir", fl.parse_text, "")
    parent = _optional(raw, "log_dir", fl.parse_text, "")
    if logdir and parent:
        raise UsageError(f"give {raw['logdir'][1]} (the log folder) or {raw['log_dir'][1]} "
                         "(its parent), not both")  # fmt: skip
    # The fixed multi-node id would make every run append to the same folder.
    name = _generated_run_id() if run_id == SHARED_RUN_ID else run_id
    return os.path.abspath(logdir or os.path.join(parent or "ddprun_logs", name))


def _rdzv(raw: dict[str, Any], min_nodes: int, max_nodes: int) -> dict[str, Any]:
    """--rdzv-backend, --rdzv-endpoint, --rdzv-conf and --rdzv-timeout, checked together."""
    backend = _optional(raw, "rdzv_backend", fl.parse_choice(fl.RDZV_BACKENDS), None)
    if backend == "static" and min_nodes != max_nodes:
        raise UsageError(f"{raw['rdzv_backend'][1]} static needs a fixed node count, got "
                         f"--nnodes {min_nodes}:{max_nodes} (use c10d for elastic jobs)")  # fmt: skip
    endpoint = _optional(raw, "rdzv_endpoint", fl.parse_endpoint, None)
    if endpoint and max_nodes > 1 and fl.endpoint_port(endpoint) == 0:
        raise UsageError(f"{raw['rdzv_endpoint'][1]} port 0 (a free port) works on one node "
                         f"only; give the {max_nodes} nodes a fixed port")  # fmt: skip
    conf = _optional(raw, "rdzv_conf", fl.parse_rdzv_conf, {})
    # The join timeout is --rdzv-timeout's setting: the flag wins, else --rdzv-conf's.
    conf_timeout = conf.pop("join_timeout", None) or conf.pop("timeout", None)
    conf.pop("timeout", None)
    default = int(conf_timeout) if conf_timeout else _default("rdzv_timeout")
    return {
        "rdzv_backend": backend,
        "rdzv_endpoint": endpoint,
        "rdzv_conf": tuple(sorted(conf.items())),
        "rdzv_timeout": _optional(raw, "rdzv_timeout", fl.positive, default),
    }


def _standalone(raw: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """As torchrun: one node on a free local port; rendezvous flags are ignored."""
    if values["max_nodes"] > 1:
        raise UsageError(f"{raw['standalone'][1]} runs one node, got --nnodes "
                         f"{values['min_nodes']}:{values['max_nodes']}")  # fmt: skip
    return {"rdzv_backend": None, "rdzv_endpoint": None, "master_port": None,
            "run_id": _generated_run_id()}  # fmt: skip


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
    fl.check_tee_value(launcher_argv, script)
    raw = fl.parse_args(launcher_argv, env, __version__)
    is_module, no_python = _program_mode(raw)
    entrypoint = _check_entrypoint(script, is_module, no_python)
    cluster = _detect(env)
    min_nodes, max_nodes, node_rank, node_rank_given = _nodes(raw, cluster)
    master_addr, master_port = _master(raw, cluster, multi_node=max_nodes > 1)
    values: dict[str, Any] = {
        "min_nodes": min_nodes,
        "max_nodes": max_nodes,
        "node_rank": node_rank,
        "node_rank_given": node_rank_given,
        "master_addr": master_addr,
        "master_port": master_port,
        "run_id": _run_id(raw, cluster, multi_node=max_nodes > 1),
        **_rdzv(raw, min_nodes, max_nodes),
    }
    if raw["standalone"][0]:
        values.update(_standalone(raw, values))
    nproc_text, nproc_source = raw["nproc"]
    nproc = fl.parse_nproc(nproc_text, nproc_source) if nproc_text is not None else "auto"
    start_methods = fl.parse_choice(fl.START_METHODS)
    return LaunchSettings(
        entrypoint=entrypoint,
        is_module=is_module,
        no_python=no_python,
        script_args=tuple(script_args),
        nproc=_resolve_nproc(nproc, nproc_source),
        logdir=_logdir(raw, values["run_id"]),
        max_restarts=_optional(raw, "max_restarts", fl.nonnegative, _default("max_restarts")),
        tee=_optional(raw, "tee", fl.parse_streams, StreamSpec()),
        redirects=_optional(raw, "redirects", fl.parse_streams, StreamSpec()),
        local_ranks_filter=_optional(raw, "local_ranks_filter", fl.parse_ranks, None),
        local_addr=_optional(raw, "local_addr", fl.parse_text, None),
        backend=_optional(raw, "backend", fl.parse_backend, _default("backend")),
        shutdown_timeout=_optional(
            raw, "shutdown_timeout", fl.nonnegative, _default("shutdown_timeout")
        ),
        monitor_interval=_optional(
            raw, "monitor_interval", fl.positive_seconds, _default("monitor_interval")
        ),
        start_method=_optional(raw, "start_method", start_methods, _default("start_method")),
        role=_optional(raw, "role", fl.parse_text, _default("role")),
        **values,
    )


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
    """Run ``ddprun`` (or ``ddprun doctor``); return the process exit status.

    Returns:
        0 on success, 1 if a worker failed, 2 on invalid arguments, 128+N after signal N.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["doctor"]:
        from ddprun.launch.doctor import main as doctor_main

        return doctor_main(args[1:])
    quiet = _quiet_torch_cpp_warnings()
    try:
        settings = build_settings(args, os.environ)
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
