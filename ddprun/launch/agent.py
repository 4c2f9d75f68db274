"""Run torch's elastic agent for this node: its `LaunchConfig`, the workers' command, signals.

Process management is torch's: `elastic_launch` runs a `LocalElasticAgent` in this process (its
main thread), which starts the workers, polls them every `monitor_interval`, stops the rest when
one fails, restarts the group up to `max_restarts` times, and on SIGINT, SIGTERM, SIGHUP, SIGQUIT
or SIGUSR1 forwards the signal to every worker, waits `shutdown_timeout` seconds, then SIGKILLs.

This module also stops workers the agent left behind once it is done. Output (rank logs,
console, ptys) is `ddprun.launch.console`'s job; which rank failed first and the summary are
`ddprun.launch.failures`'; the rendezvous backend the agent asks for is
`ddprun.launch.rendezvous`'.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from ddprun.launch.console import RankLogMirror, RankLogsSpecs
from ddprun.launch.failures import report_child_failure, restart_reason
from ddprun.launch.rendezvous import error_hint, register_rendezvous
from ddprun.launch.settings import LaunchSettings

__all__ = ["build_launch_config", "launch", "launch_config_values", "worker_command"]


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


_LEFTOVER_WAIT_SECONDS = 5.0


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
    register_rendezvous()
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
        print(f"ddprun: launch failed: {what}{error_hint(exc, settings)}", file=sys.stderr)
        return 1
    finally:
        _set_stop_signals(signal.SIG_IGN)  # let the cleanup finish even on a second Ctrl-C
        mirror.close()
        _kill_leftover_workers()
        _restore_stop_signals()
