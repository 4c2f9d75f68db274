"""Run torch's elastic agent for this node; own per-rank logs, signals and the failure summary.

Process management is torch's: `elastic_launch` runs a `LocalElasticAgent` in this process (its
main thread), which starts the workers, polls them every `monitor_interval`, stops the rest when
one fails, restarts the group up to `max_restarts` times, and on SIGINT, SIGTERM, SIGHUP, SIGQUIT
or SIGUSR1 forwards the signal to every worker, waits `shutdown_timeout` seconds, then SIGKILLs.

Output (rank logs, console, ptys) is `ddprun.launch.console`'s job; which rank failed first
and the summary are `ddprun.launch.failures`'.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any

import psutil
import torch.distributed.launcher.api as _launcher_api
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.elastic.rendezvous import (
    RendezvousConnectionError,
    RendezvousError,
    RendezvousHandler,
    RendezvousInfo,
    RendezvousParameters,
    RendezvousTimeoutError,
    rendezvous_handler_registry,
)
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from ddprun.launch.cli import NODE_RANK_CONFIG, RDZV_BACKEND, LaunchSettings
from ddprun.launch.console import RankLogMirror, RankLogsSpecs
from ddprun.launch.failures import choose_root_failure, report_child_failure, restart_reason

__all__ = [
    "RankLogMirror",
    "RankLogsSpecs",
    "build_launch_config",
    "choose_root_failure",
    "launch",
    "launch_config_values",
    "worker_command",
]

_LEFTOVER_WAIT_SECONDS = 5.0
#: The job-wide restart count every worker sees (see `FreshWorkerStoreRendezvous`).
RESTART_COUNT_ENV = "DDPRUN_RESTART_COUNT"


class FreshWorkerStoreRendezvous(RendezvousHandler):
    """torch's c10d rendezvous, except that every round gives the workers a new store and
    nodes with a fixed node rank get it as their group rank.

    Since torch 2.5 the c10d handler hosts the workers' TCPStore in the agent and, in torch
    2.13, creates it once and hands the same server to every round. Workers do not prefix
    their keys per attempt, so after a restart a rank can read a peer's address from the
    failed attempt: gloo then fails with "connectFullMesh ... Connection refused" (NCCL gets
    a stale unique id; pytorch/pytorch#135712, #167288). Dropping the cached server before
    each round makes rank 0's agent bind a new one on port 0, as torch intended (PR #135957),
    so keys never leak between attempts and no port is ever probed. The rendezvous store
    itself (127.0.0.1:0 or the endpoint) is created once and kept for the whole run.

    Every round the nodes also publish, in the round's store, their node rank (when fixed)
    and how many rounds they joined before; this is where two things are settled:

    - Group ranks. torch's c10d rendezvous ranks the nodes by (host name, agent pid), not by
      ``--node-rank``: on one machine the launcher started first becomes group 0, on a cluster
      the alphabetically first host. With `node_rank` set (a fixed-size job whose node rank
      was given, or SLURM's), each node takes it as its group rank, so GROUP_RANK == node rank
      and node 0's first worker is global rank 0 (the one that writes logs and checkpoints).
      Two nodes claiming one rank fail the launch with a clear message.
    - The job's restart count. Each agent counts only its own restarts, so a node that joins
      a job that already ran (a replaced node, an elastic scale-up) would start its workers
      with TORCHELASTIC_RESTART_COUNT=0 while the others resume from last.pth. The largest
      count of earlier rounds over all nodes is exported as DDPRUN_RESTART_COUNT; the worker
      wrapper raises TORCHELASTIC_RESTART_COUNT to it, so every rank agrees on resuming.
    """

    # Private attributes of torch's DynamicRendezvousHandler; absent in other versions, in
    # which case torch's own behaviour is kept.
    _CACHED = ("_shared_tcp_store_server", "_bootstrap_store_info")
    _NODE_KEY = "ddprun/node/"

    def __init__(self, inner: RendezvousHandler, node_rank: int | None = None) -> None:
        self._inner = inner
        self._node_rank = node_rank
        self._rounds = 0  # rounds this node completed before the current one

    @property
    def use_agent_store(self) -> bool:
        return self._inner.use_agent_store

    def next_rendezvous(self) -> RendezvousInfo:
        for name in self._CACHED:
            if hasattr(self._inner, name):
                setattr(self._inner, name, None)
        info = self._agree(self._inner.next_rendezvous())
        self._rounds += 1
        return info

    def _agree(self, info: RendezvousInfo) -> RendezvousInfo:
        """Exchange (node rank, earlier rounds) with the round's other nodes; apply both."""
        store, world_size = info.store, info.world_size
        store.set(f"{self._NODE_KEY}{info.rank}", json.dumps([self._node_rank, self._rounds]))
        nodes = [json.loads(store.get(f"{self._NODE_KEY}{rank}")) for rank in range(world_size)]
        os.environ[RESTART_COUNT_ENV] = str(max(rounds for _, rounds in nodes))
        if self._node_rank is None:
            return info
        claimed = [node_rank for node_rank, _ in nodes]
        if None in claimed or sorted(claimed) != list(range(world_size)):
            raise RendezvousError(
                f"the {world_size} nodes gave node ranks {claimed}; each node needs its own "
                f"--node-rank in 0..{world_size - 1}"
            )
        return RendezvousInfo(store, self._node_rank, world_size, info.bootstrap_store_info)

    def get_backend(self) -> str:
        return RDZV_BACKEND

    def get_run_id(self) -> str:
        return self._inner.get_run_id()

    def is_closed(self) -> bool:
        return self._inner.is_closed()

    def set_closed(self) -> None:
        self._inner.set_closed()

    def num_nodes_waiting(self) -> int:
        return self._inner.num_nodes_waiting()

    def shutdown(self) -> bool:
        return self._inner.shutdown()


def _create_rendezvous(params: RendezvousParameters) -> RendezvousHandler:
    config = dict(params.config)
    node_rank = config.pop(NODE_RANK_CONFIG, None)
    c10d = RendezvousParameters(
        "c10d", params.endpoint, params.run_id, params.min_nodes, params.max_nodes,
        params.local_addr, **config,
    )  # fmt: skip
    inner = rendezvous_handler_registry.create_handler(c10d)
    return FreshWorkerStoreRendezvous(inner, None if node_rank is None else int(node_rank))


def _register_rendezvous() -> None:
    """Register ddprun's backend name; registering the same creator again is a no-op."""
    rendezvous_handler_registry.register(RDZV_BACKEND, _create_rendezvous)


def launch_config_values(settings: LaunchSettings, logs_specs: DefaultLogsSpecs) -> dict[str, Any]:
    """Every `LaunchConfig` field, set explicitly.

    LaunchConfig's own defaults differ from torchrun's command line (etcd rendezvous, 3
    restarts, role "default_role"); nothing here is left to them.
    """
    rdzv = settings.rendezvous()
    return {
        "min_nodes": settings.min_nodes,
        "max_nodes": settings.max_nodes,
        "nproc_per_node": settings.nproc,
        "logs_specs": logs_specs,
        "run_id": settings.run_id,
        "role": settings.role,
        "rdzv_endpoint": rdzv.endpoint,
        "rdzv_backend": rdzv.backend,
        "rdzv_configs": dict(rdzv.configs),
        "rdzv_timeout": -1,  # legacy field: the timeout is rdzv_configs["timeout"]
        "max_restarts": settings.max_restarts,
        "monitor_interval": settings.monitor_interval,
        "start_method": settings.start_method,  # used only for function entrypoints
        "log_line_prefix_template": None,  # console lines are written by RankLogMirror
        "metrics_cfg": {},
        "local_addr": rdzv.local_addr,
        "event_log_handler": "null",
        "numa_options": None,  # torch picks its GPU default when nproc == visible GPUs
        "signals_to_handle": settings.signals_to_handle,
        "duplicate_stdout_filters": None,
        "duplicate_stderr_filters": None,
        "virtual_local_rank": False,
        "shutdown_timeout": settings.shutdown_timeout,
    }


def build_launch_config(settings: LaunchSettings, logs_specs: DefaultLogsSpecs) -> LaunchConfig:
    """Create the `LaunchConfig`; fields unknown to the installed torch are left out."""
    known = {field.name for field in dataclasses.fields(LaunchConfig)}
    values = launch_config_values(settings, logs_specs)
    return LaunchConfig(**{name: value for name, value in values.items() if name in known})


def worker_command(settings: LaunchSettings) -> tuple[str, list[str]]:
    """The program and arguments the agent starts for every worker.

    With --no-python the program itself, as torchrun does: ddprun's wrapper is Python.
    """
    mode = "module" if settings.is_module else "script"
    args = ["-u", "-m", "ddprun.launch.worker", mode, settings.entrypoint, *settings.script_args]
    if settings.no_python:
        return settings.entrypoint, [arg.replace("$", "$$") for arg in settings.script_args]
    # The agent expands ${local_rank} in arguments with string.Template, which also turns "$$"
    # into "$"; doubling every "$" hands the script its arguments unchanged.
    return sys.executable, [arg.replace("$", "$$") for arg in args]


def _export_worker_env(settings: LaunchSettings) -> None:
    """Variables every worker inherits besides torch's own (RANK, WORLD_SIZE, ...)."""
    os.environ["DDPRUN_RUN_ID"] = settings.run_id
    os.environ["DDPRUN_LOGDIR"] = settings.logdir
    os.environ["DDPRUN_AGENT_PID"] = str(os.getpid())
    if settings.backend:
        os.environ["DDPRUN_BACKEND"] = settings.backend


def _quiet_torch_logging() -> None:
    """Keep the agent's own log lines off the console; the summary says what matters.

    DDPRUN_LOG_LEVEL (e.g. WARNING or INFO) shows them again for debugging the launcher.
    """
    level = os.environ.get("DDPRUN_LOG_LEVEL", "CRITICAL").upper()
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(level)
    handler.setFormatter(
        logging.Formatter("%(asctime)s ddprun[agent] %(levelname)s %(name)s: %(message)s")
    )
    parent = logging.getLogger("torch.distributed")
    parent.handlers = [handler]
    parent.propagate = False
    if logging.getLevelName(level) in (logging.DEBUG, logging.INFO):
        for name, logger in list(logging.root.manager.loggerDict.items()):
            if name.startswith("torch.distributed") and isinstance(logger, logging.Logger):
                logger.setLevel(level)


# SIGUSR1 is SLURM's usual "time limit near" warning (--signal=USR1@T): like SIGTERM it is
# forwarded to the workers (the runner saves last.pth on either) and the launcher exits 138.
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1)


def _set_stop_signals(handler: Any) -> None:
    for sig in _STOP_SIGNALS:
        signal.signal(sig, handler)


def _restore_stop_signals() -> None:
    """Drop the agent's handlers (they raise SignalException) once it has finished."""
    _set_stop_signals(signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _leftover_workers() -> list[psutil.Process]:
    workers = []
    for child in psutil.Process().children():
        try:
            if "ddprun.launch.worker" in child.cmdline():
                workers.append(child)
        except psutil.Error:  # exited meanwhile
            pass
    return workers


def _kill_leftover_workers() -> None:
    """Last safety net: SIGKILL workers the agent did not reap (e.g. its shutdown was cut
    short by a second signal), with their process groups, as the agent itself would."""
    workers = _leftover_workers()
    for worker in workers:
        try:
            os.killpg(worker.pid, signal.SIGKILL)  # each worker leads its own session
        except OSError:
            pass
    psutil.wait_procs(workers, timeout=_LEFTOVER_WAIT_SECONDS)


def _launch_error_hint(error: Exception, settings: LaunchSettings) -> str:
    """What a rendezvous error most likely means for a multi-node job."""
    if settings.is_single_node:
        return ""
    endpoint = settings.rendezvous().endpoint
    if isinstance(error, RendezvousTimeoutError):
        return (
            f" (fewer than {settings.min_nodes} nodes joined {endpoint} within "
            f"{settings.rdzv_timeout} s; see --rdzv-timeout)"
        )
    if isinstance(error, RendezvousConnectionError) and settings.rendezvous().configs.get(
        "is_host"
    ):
        return f" (could not host the rendezvous store on {endpoint}: port taken, or two node 0s?)"
    if isinstance(error, RendezvousConnectionError):
        return f" (the rendezvous store at {endpoint} is unreachable: is node 0's launcher up?)"
    return ""


# Once a worker has failed there is nothing left to save: the others get this much time between
# SIGTERM and SIGKILL. A signal to the launcher keeps the full --shutdown-timeout.
_FAILURE_GRACE_SECONDS = 5


class _ShortFailureGraceAgent(LocalElasticAgent):
    """torch's agent, except that stopping the group after a worker failure waits at most
    `_FAILURE_GRACE_SECONDS` (torch hardcodes 30 s there; a hung rank that only sets its
    stop flag on SIGTERM would keep the job alive that long), and that a restart first says
    which rank failed and why (`ddprun.launch.failures.restart_reason`)."""

    def _grace(self) -> int:
        return min(int(self._shutdown_timeout), _FAILURE_GRACE_SECONDS)

    def _start_workers(self, worker_group: Any) -> Any:
        ids = super()._start_workers(worker_group)
        context = getattr(self, "_pcontext", None)
        if context is not None:  # PContext._poll closes with torch's 30 s on a failure
            close, grace = context.close, self._grace()
            context.close = lambda death_sig=None, timeout=grace: close(death_sig, timeout)
        return ids

    def _stop_workers(self, worker_group: Any) -> None:  # before a restart or a final failure
        self._shutdown(timeout=self._grace())

    def _monitor_workers(self, worker_group: Any) -> Any:
        result = super()._monitor_workers(worker_group)
        if result.is_failed():  # kept for the restart line
            self._ddprun_failures = dict(result.failures)
        return result

    def _restart_workers(self, worker_group: Any) -> None:
        # Say which rank failed and why before the restart (RankLogMirror prints it once the
        # failed attempt's output is complete); no local failure: the node group changed.
        failures, self._ddprun_failures = getattr(self, "_ddprun_failures", {}), {}
        mirror = getattr(self._logs_specs, "mirror", None)
        if mirror is not None:
            mirror.restart_reason = (
                restart_reason(failures, mirror.rank_log)
                if failures
                else "the node group changed (a node joined, or another node restarted)"
            )
        super()._restart_workers(worker_group)


@contextlib.contextmanager
def _short_failure_grace() -> Iterator[None]:
    # elastic_launch builds its agent from this module-level name; swap it for the launch only
    original = _launcher_api.LocalElasticAgent
    _launcher_api.LocalElasticAgent = _ShortFailureGraceAgent
    try:
        yield
    finally:
        _launcher_api.LocalElasticAgent = original


def launch(settings: LaunchSettings) -> int:
    """Run the workers described by `settings` on this node and wait for them.

    Returns:
        0 when every worker succeeded, 1 when one failed (after any restarts) or the launch
        itself failed, 128+N when the launcher was stopped by signal N.
    """
    _quiet_torch_logging()
    _register_rendezvous()
    mirror = RankLogMirror(
        os.path.join(settings.logdir, "ranks"),
        bool(settings.tee),
        settings.max_restarts,
        settings.console_streams,
    )
    os.makedirs(mirror.ranks_dir, exist_ok=True)
    specs = RankLogsSpecs(os.path.join(settings.logdir, "elastic"), mirror)
    _export_worker_env(settings)
    entrypoint, args = worker_command(settings)
    try:
        with _short_failure_grace():
            elastic_launch(build_launch_config(settings, specs), entrypoint)(*args)
        return 0
    except ChildFailedError as error:
        _set_stop_signals(signal.SIG_IGN)  # a second signal must not cut the report short
        mirror.close()  # the rank logs and console must be complete before the summary
        return report_child_failure(error, mirror)
    except SignalException as exc:
        # e.g. SIGUSR1, then srun's SIGTERM once another node's launcher has exited
        _set_stop_signals(signal.SIG_IGN)
        mirror.close()
        print(f"ddprun: stopped by {exc.sigval.name}; all workers were stopped", file=sys.stderr)
        return 128 + int(exc.sigval)
    except KeyboardInterrupt:  # Ctrl-C before the agent installed its handlers
        return 128 + signal.SIGINT
    except Exception as exc:  # rendezvous and other launcher errors: one line, no torch dump
        _set_stop_signals(signal.SIG_IGN)
        what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        print(f"ddprun: launch failed: {what}{_launch_error_hint(exc, settings)}", file=sys.stderr)
        return 1
    finally:
        _set_stop_signals(signal.SIG_IGN)  # let the cleanup finish even on a second Ctrl-C
        mirror.close()
        _kill_leftover_workers()
        _restore_stop_signals()
