"""``ddprun`` command line: parse, validate, resolve defaults -> one `LaunchSettings`.

The flags (ddprun's own names and torchrun's, in both spellings) live in `flags.py`, the
parsers of their values in `values.py`, the settings object in `settings.py`; this module
checks the values together and resolves them. Every flag has an environment twin (``--nproc``
<-> ``DDPRUN_NPROC``). Precedence, highest first: the flag, its twin, the cluster scheduler
(SLURM, see `cluster.py`), the default declared on `LaunchSettings`. Everything after the
script (or after ``-m module``) belongs to the script and is passed on untouched, even when it
looks like a ddprun flag.

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
from typing import Any

from ddprun import __version__
from ddprun.launch import flags as fl
from ddprun.launch import values as va
from ddprun.launch.cluster import ClusterError, ClusterInfo, detect_cluster
from ddprun.launch.flags import split_argv
from ddprun.launch.settings import LaunchSettings
from ddprun.launch.values import StreamSpec, UsageError

__all__ = ["UsageError", "build_settings", "main", "split_argv"]

#: Rendezvous id of multi-node runs given none (and not under SLURM).
SHARED_RUN_ID = "ddprun"


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
        min_nodes, max_nodes = va.parse_nnodes(nnodes_text, source)
    elif cluster is not None:
        min_nodes = max_nodes = cluster.nnodes
    else:
        min_nodes, max_nodes = _default("min_nodes"), _default("max_nodes")
    rank_text, source = raw["node_rank"]
    given = True
    if rank_text is not None:
        expected = f"an integer in 0..{max_nodes - 1}"
        node_rank = va.parse_int(rank_text, source, 0, max_nodes - 1, expected)
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
    port = va.parse_port(port_text, port_source) if port_text is not None else None
    if multi_node and cluster is not None:
        addr = addr if addr is not None else cluster.master_addr
        port = port if port is not None else cluster.master_port
    return (addr if addr is not None else _default("master_addr")), port


def _optional(raw: dict[str, Any], name: str, parse: Any, default: Any) -> Any:
    value, source = raw[name]
    return default if value is None else parse(value, source)


def _run_id(raw: dict[str, Any], cluster: ClusterInfo | None, multi_node: bool) -> str:
    """The rendezvous id: given, else SLURM's job id, else one every node can agree on."""
    given = _optional(raw, "rdzv_id", va.parse_run_id, None)
    if given:
        return given
    if cluster is not None:
        return va.parse_run_id(cluster.job_id, "SLURM_JOB_ID")
    # Nodes cannot agree on a random id, so several nodes share a fixed one (torchrun: "none").
    return SHARED_RUN_ID if multi_node else _generated_run_id()


def _logdir(raw: dict[str, Any], run_id: str) -> str:
    """--logdir DIR is the folder itself; torchrun's --log-dir DIR a parent: DIR/<run id>."""
    logdir = _optional(raw, "logdir", va.parse_text, "")
    parent = _optional(raw, "log_dir", va.parse_text, "")
    if logdir and parent:
        raise UsageError(f"give {raw['logdir'][1]} (the log folder) or {raw['log_dir'][1]} "
                         "(its parent), not both")  # fmt: skip
    # The fixed multi-node id would make every run append to the same folder.
    name = _generated_run_id() if run_id == SHARED_RUN_ID else run_id
    return os.path.abspath(logdir or os.path.join(parent or "ddprun_logs", name))


def _rdzv(raw: dict[str, Any], min_nodes: int, max_nodes: int) -> dict[str, Any]:
    """--rdzv-backend, --rdzv-endpoint, --rdzv-conf and --rdzv-timeout, checked together."""
    backend = _optional(raw, "rdzv_backend", va.parse_choice(fl.RDZV_BACKENDS), None)
    if backend == "static" and min_nodes != max_nodes:
        raise UsageError(f"{raw['rdzv_backend'][1]} static needs a fixed node count, got "
                         f"--nnodes {min_nodes}:{max_nodes} (use c10d for elastic jobs)")  # fmt: skip
    endpoint = _optional(raw, "rdzv_endpoint", va.parse_endpoint, None)
    if endpoint and max_nodes > 1 and va.endpoint_port(endpoint) == 0:
        raise UsageError(f"{raw['rdzv_endpoint'][1]} port 0 (a free port) works on one node "
                         f"only; give the {max_nodes} nodes a fixed port")  # fmt: skip
    conf = _optional(raw, "rdzv_conf", va.parse_rdzv_conf, {})
    # The join timeout is --rdzv-timeout's setting: the flag wins, else --rdzv-conf's.
    conf_timeout = conf.pop("join_timeout", None) or conf.pop("timeout", None)
    conf.pop("timeout", None)
    default = int(conf_timeout) if conf_timeout else _default("rdzv_timeout")
    return {
        "rdzv_backend": backend,
        "rdzv_endpoint": endpoint,
        "rdzv_conf": tuple(sorted(conf.items())),
        "rdzv_timeout": _optional(raw, "rdzv_timeout", va.positive, default),
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
    nproc = va.parse_nproc(nproc_text, nproc_source) if nproc_text is not None else "auto"
    start_methods = va.parse_choice(fl.START_METHODS)
    return LaunchSettings(
        entrypoint=entrypoint,
        is_module=is_module,
        no_python=no_python,
        script_args=tuple(script_args),
        nproc=_resolve_nproc(nproc, nproc_source),
        logdir=_logdir(raw, values["run_id"]),
        max_restarts=_optional(raw, "max_restarts", va.nonnegative, _default("max_restarts")),
        tee=_optional(raw, "tee", va.parse_streams, StreamSpec()),
        redirects=_optional(raw, "redirects", va.parse_streams, StreamSpec()),
        local_ranks_filter=_optional(raw, "local_ranks_filter", va.parse_ranks, None),
        local_addr=_optional(raw, "local_addr", va.parse_text, None),
        backend=_optional(raw, "backend", va.parse_backend, _default("backend")),
        shutdown_timeout=_optional(
            raw, "shutdown_timeout", va.nonnegative, _default("shutdown_timeout")
        ),
        monitor_interval=_optional(
            raw, "monitor_interval", va.positive_seconds, _default("monitor_interval")
        ),
        start_method=_optional(raw, "start_method", start_methods, _default("start_method")),
        role=_optional(raw, "role", va.parse_text, _default("role")),
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
