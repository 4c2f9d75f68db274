"""Command line: splitting, env twins, precedence, and one-line errors with status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ddprun.launch.cli import UsageError, build_settings, split_argv
from ddprun.launch.settings import LaunchSettings

from .helpers import clean_env, ddprun_argv


@pytest.fixture
def script(tmp_path: Path) -> str:
    path = tmp_path / "train.py"
    path.write_text("print('hi')\n")
    return str(path)


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["--nproc", "2", "t.py", "--lr", "0.1", "-x"],
            (["--nproc", "2"], "t.py", ["--lr", "0.1", "-x"]),
        ),
        (["t.py", "--nproc", "3", "--help"], ([], "t.py", ["--nproc", "3", "--help"])),
        (["-m", "pkg.mod", "-m", "x"], (["-m"], "pkg.mod", ["-m", "x"])),
        (["--tee", "--nproc=2", "t.py", "--", "a"], (["--tee", "--nproc=2"], "t.py", ["--", "a"])),
        (["--nproc", "2", "--", "t.py", "a"], (["--nproc", "2"], "t.py", ["a"])),
        (["--nproc", "2"], (["--nproc", "2"], None, [])),
    ],
)
def test_split_argv_gives_everything_after_the_script_to_the_script(argv, expected) -> None:
    assert split_argv(argv) == expected


@pytest.mark.timeout(10)
def test_flags_beat_env_twins_which_beat_defaults(script: str) -> None:
    env = {
        "DDPRUN_NPROC": "3",
        "DDPRUN_MAX_RESTARTS": "2",
        "DDPRUN_TEE": "1",
        "DDPRUN_BACKEND": "gloo",
    }
    settings = build_settings(["--nproc", "4", script, "--lr", "0.1"], env)
    assert settings.nproc == 4  # flag wins
    assert settings.max_restarts == 2 and settings.tee and settings.backend == "gloo"  # twins
    assert settings.script_args == ("--lr", "0.1")
    assert settings.shutdown_timeout == LaunchSettings().shutdown_timeout  # dataclass default
    assert settings.logdir.endswith(f"ddprun_logs/{settings.run_id}")


@pytest.mark.timeout(10)
def test_single_node_uses_a_free_port_on_loopback(script: str) -> None:
    rdzv = build_settings(["--nproc", "2", script], {}).rendezvous()
    assert (rdzv.backend, rdzv.endpoint, rdzv.local_addr) == (
        "ddprun-c10d",
        "127.0.0.1:0",
        "127.0.0.1",
    )
    assert rdzv.configs["is_host"] is True


@pytest.mark.timeout(10)
def test_multi_node_rendezvous_choices(script: str) -> None:
    fixed = build_settings(["--nproc", "2", "--nnodes", "2", "--node-rank", "1",
                             "--master-addr", "10.0.0.1", "--master-port", "1234", script], {})  # fmt: skip
    assert fixed.rendezvous().endpoint == "10.0.0.1:1234"
    assert fixed.rendezvous().configs["is_host"] is False  # node 0 hosts the store
    elastic = build_settings(
        ["--nproc", "2", "--nnodes", "1:4", "--rdzv-endpoint", "h:29400", script], {}
    )
    assert (elastic.min_nodes, elastic.max_nodes) == (1, 4)
    assert elastic.rendezvous().endpoint == "h:29400"


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("argv", "env", "needle"),
    [
        (["--nproc", "abc"], {}, "--nproc must be a positive integer, 'auto', 'cpu' or 'gpu'"),
        (["--nproc", "0"], {}, "--nproc"),
        ([], {"DDPRUN_NPROC": "x"}, "DDPRUN_NPROC must be a positive integer"),
        (["--master-port", "70000"], {}, "--master-port must be a port number in 1..65535"),
        (["--nnodes", "3:2"], {}, "--nnodes must be N or MIN:MAX"),
        (["--nnodes", "2", "--node-rank", "2"], {}, "--node-rank must be an integer in 0..1"),
        (["--backend", "mpi"], {}, "--backend must be 'gloo' or 'nccl'"),
        (["--rdzv-endpoint", "nohost"], {}, "--rdzv-endpoint must be HOST:PORT"),
        (["--max-restarts", "-1"], {}, "--max-restarts must be an integer >= 0"),
    ],
)
def test_invalid_values_raise_one_clear_message(script: str, argv, env, needle) -> None:
    with pytest.raises(UsageError) as info:
        build_settings([*argv, script], env)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(ddprun_argv(*args), cwd=cwd, env=clean_env(), capture_output=True,
                          text=True, timeout=20)  # fmt: skip


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--nproc", "abc", "train.py"], "--nproc"),
        (["--master-port", "99999", "train.py"], "--master-port"),
        (["--nproc", "2", "missing.py"], "script not found: 'missing.py'"),
        (["--nproc", "2"], "missing the script"),
        (["--bogus", "train.py"], "unrecognized arguments: --bogus"),
    ],
)
def test_cli_exits_2_with_one_line_and_no_traceback(tmp_path: Path, args, needle) -> None:
    (tmp_path / "train.py").write_text("print('hi')\n")
    result = _cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ddprun: error:") and needle in lines[0]
    assert result.stdout == ""


@pytest.mark.timeout(30)
def test_help_is_fast_because_the_cli_does_not_import_torch(tmp_path: Path) -> None:
    code = "import sys, ddprun.launch.cli; print(sorted(m for m in ('torch', 'tensorboard') if m in sys.modules))"
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20)
    assert probe.stdout.strip() == "[]"
    result = _cli("--help", cwd=tmp_path)
    assert result.returncode == 0 and "--nproc" in result.stdout and "DDPRUN_NPROC" in result.stdout


@pytest.mark.timeout(30)
def test_nproc_auto_is_the_visible_gpus_or_two(script: str) -> None:
    import torch

    expected = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert build_settings(["--nproc", "auto", script], {}).nproc == (expected or 2)
    assert build_settings([script], {}).nproc == (expected or 2)  # auto is the default
