"""``ddprun doctor``: real checks on this machine, a closed and an open loopback endpoint, a
wrong GLOO_SOCKET_IFNAME (the real all-reduce fails), a timeout, and bad arguments."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import psutil
import pytest

from ddprun.distributed import find_free_port

from .helpers import clean_env, ddprun_argv

DOCTOR_TIMEOUT = 180  # seconds: two workers import torch on a shared machine


def _doctor(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(ddprun_argv("doctor", *args, "--timeout", "120"), cwd=tmp_path,
                          env=clean_env(**env), capture_output=True, text=True,
                          timeout=DOCTOR_TIMEOUT)  # fmt: skip


def _doctor_workers() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "ddprun.launch.doctor" in cmdline and "_worker" in cmdline:
            found.append(proc)
    return found


@pytest.mark.timeout(DOCTOR_TIMEOUT + 30)
def test_doctor_on_this_machine_passes(tmp_path: Path) -> None:
    result = _doctor(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""
    out = result.stdout
    assert "torch 2." in out and "gloo: yes" in out and "nccl:" in out
    assert "CPU cores" in out and "network" in out
    assert "all-reduce gloo: ok, 2 processes summed 1 + 2 = 3" in out
    assert "result     ok: no problem found" in out


@pytest.mark.timeout(DOCTOR_TIMEOUT + 30)
@pytest.mark.parametrize("flags", ["endpoint", "master"])
def test_unreachable_endpoint_is_one_problem_line_with_its_fix(tmp_path: Path, flags) -> None:
    port = str(find_free_port())  # released: nothing listens there now
    args = (["--rdzv-endpoint", f"127.0.0.1:{port}"] if flags == "endpoint"
            else ["--master_addr", "127.0.0.1", "--master-port", port])  # fmt: skip
    result = _doctor(tmp_path, *args)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ddprun doctor: problem: ")
    assert f"127.0.0.1:{port}" in lines[0] and "connection refused" in lines[0]
    assert "; fix: start ddprun on node 0 first" in lines[0]
    assert f"127.0.0.1:{port}: NOT reachable" in result.stdout
    assert "all-reduce gloo: ok" in result.stdout  # the other checks still ran


@pytest.mark.timeout(DOCTOR_TIMEOUT + 30)
def test_reachable_endpoint_passes(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        result = _doctor(tmp_path, "--rdzv_endpoint", f"127.0.0.1:{port}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"127.0.0.1:{port}: reachable" in result.stdout


@pytest.mark.timeout(DOCTOR_TIMEOUT + 30)
def test_wrong_gloo_interface_is_named_and_breaks_the_real_all_reduce(tmp_path: Path) -> None:
    result = _doctor(tmp_path, GLOO_SOCKET_IFNAME="nosuchif0")
    assert result.returncode == 1
    problems = result.stderr.strip().splitlines()
    assert any(
        "GLOO_SOCKET_IFNAME=nosuchif0 names no interface" in line and "; fix: set" in line
        for line in problems
    ), result.stderr
    assert any(line.startswith("ddprun doctor: problem: gloo all-reduce") and "; fix: " in line
               for line in problems), result.stderr  # fmt: skip
    assert "all-reduce gloo: FAILED" in result.stdout


@pytest.mark.timeout(60)
def test_a_hung_all_reduce_is_killed_at_the_timeout(tmp_path: Path) -> None:
    # 0.3 s is too short for the workers to even import torch: the timeout path runs
    result = subprocess.run(ddprun_argv("doctor", "--timeout", "0.3"), cwd=tmp_path,
                            env=clean_env(), capture_output=True, text=True, timeout=50)  # fmt: skip
    assert result.returncode == 1
    assert "gloo all-reduce between 2 local processes: did not finish within 0.3 s" in (
        result.stderr
    )
    assert _doctor_workers() == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--timeout", "0"], "--timeout must be a number of seconds > 0"),
        (["--rdzv-endpoint", "nohost"], "--rdzv-endpoint must be HOST:PORT"),
        (["--master-port", "99999"], "--master-port must be a port number"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_doctor_bad_arguments_exit_2(tmp_path: Path, args, needle) -> None:
    result = subprocess.run(ddprun_argv("doctor", *args), cwd=tmp_path, env=clean_env(),
                            capture_output=True, text=True, timeout=50)  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr


@pytest.mark.timeout(120)
def test_doctor_is_a_subcommand_only_as_the_first_argument(tmp_path: Path) -> None:
    """A script file named doctor still runs as ``ddprun -- doctor``."""
    (tmp_path / "doctor").write_text("import os\nopen(f\"ran{os.environ['RANK']}\", 'w').close()\n")
    result = subprocess.run(ddprun_argv("--nproc", "1", "--", "doctor"), cwd=tmp_path,
                            env=clean_env(), capture_output=True, text=True, timeout=110)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "ran0").exists() and "ddprun doctor" not in result.stdout
    help_text = subprocess.run(ddprun_argv("doctor", "--help"), cwd=tmp_path, env=clean_env(),
                               capture_output=True, text=True, timeout=50)  # fmt: skip
    assert help_text.returncode == 0 and "usage: ddprun doctor" in help_text.stdout
