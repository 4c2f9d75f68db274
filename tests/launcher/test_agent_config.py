"""What the agent is given: every LaunchConfig field, the worker command, the root-cause choice."""

from __future__ import annotations

import dataclasses
import json
import signal
from pathlib import Path

import pytest
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure
from torch.distributed.launcher.api import LaunchConfig

from ddprun.launch.agent import build_launch_config, launch_config_values, worker_command
from ddprun.launch.cli import build_settings
from ddprun.launch.failures import choose_root_failure


@pytest.fixture
def settings(tmp_path: Path):
    script = tmp_path / "train.py"
    script.write_text("print('hi')\n")
    return build_settings(
        ["--nproc", "2", "--logdir", str(tmp_path / "logs"), str(script), "a$$b", "${local_rank}"],
        {},
    )


@pytest.mark.timeout(30)
def test_every_launch_config_field_is_set_explicitly(settings, tmp_path: Path) -> None:
    specs = DefaultLogsSpecs(log_dir=str(tmp_path / "elastic"))
    values = launch_config_values(settings, specs)
    missing = {field.name for field in dataclasses.fields(LaunchConfig)} - set(values)
    assert not missing, f"LaunchConfig fields left to torch's defaults: {missing}"
    config = build_launch_config(settings, specs)
    # The LaunchConfig defaults that differ from torchrun's command line must not leak in.
    assert (
        config.rdzv_backend == "ddprun-c10d"
        and config.max_restarts == 0
        and config.role == "default"
    )
    assert config.rdzv_endpoint == "127.0.0.1:0" and config.run_id == settings.run_id


@pytest.mark.timeout(10)
def test_worker_command_protects_dollars_from_the_agents_template(settings) -> None:
    from string import Template

    _, args = worker_command(settings)
    # The agent runs string.Template(arg).safe_substitute(local_rank=...) on every argument.
    seen = [Template(arg).safe_substitute(local_rank="7") for arg in args]
    assert seen[-2:] == ["a$$b", "${local_rank}"]
    assert seen[:4] == ["-u", "-m", "ddprun.launch.worker", "script"]


def _failure(tmp_path: Path, local_rank: int, exitcode: int, extra: dict | None) -> ProcessFailure:
    error_file = tmp_path / f"error{local_rank}.json"
    if extra is not None:
        info = {
            "py_callstack": "Traceback...\nX: y\n",
            "timestamp": str(int(extra["time"])),
            "ddprun": extra,
        }
        error_file.write_text(json.dumps({"message": {"message": "X: y", "extraInfo": info}}))
    return ProcessFailure(
        local_rank=local_rank, pid=100 + local_rank, exitcode=exitcode, error_file=str(error_file)
    )


@pytest.mark.timeout(10)
def test_root_cause_is_the_real_failure_not_its_echo(tmp_path: Path) -> None:
    # rank 0 saw "connection closed" first within the same second; rank 1 raised a real error.
    failures = {
        0: _failure(tmp_path, 0, 1, {"time": 1000.2, "collateral": True}),
        1: _failure(tmp_path, 1, 1, {"time": 1000.5, "collateral": False}),
        2: _failure(tmp_path, 2, -signal.SIGTERM, None),  # stopped by the agent
    }
    assert choose_root_failure(failures).rank == 1


@pytest.mark.timeout(10)
def test_root_cause_prefers_the_earliest_exact_time(tmp_path: Path) -> None:
    failures = {
        0: _failure(tmp_path, 0, 1, {"time": 1000.9, "collateral": False}),
        1: _failure(tmp_path, 1, 1, {"time": 1000.1, "collateral": False}),
    }
    assert choose_root_failure(failures).rank == 1
    killed = {
        3: _failure(tmp_path, 3, -signal.SIGKILL, None),
        4: _failure(tmp_path, 4, -signal.SIGTERM, None),
    }
    assert choose_root_failure(killed).rank == 3  # an OOM kill is a root cause, a SIGTERM is not
