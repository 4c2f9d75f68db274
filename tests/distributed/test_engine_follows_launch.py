"""The engine follows the launch (issue 11, item 1): no engine named under `ddprun --nproc 2`
runs DDP; a single-process engine named there fails fast on every rank, writing nothing."""

from __future__ import annotations

import json

import pytest

from tests.distributed.conftest import ddprun, run, script

pytestmark = pytest.mark.timeout(240)


@pytest.mark.parametrize(
    ("choice", "engine"),
    [("none", "DistributedDataParallelEngine"), ("amp-none", "DistributedDataParallelAMPEngine")],
)
def test_no_engine_named_under_the_launcher_runs_ddp(tmp_path, choice, engine):
    result = run(ddprun(2, "engine_choice", "--out", str(tmp_path), "--engine", choice), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    info = json.loads((tmp_path / "engine.json").read_text())
    assert info == {"engine": engine, "world": 2}


def test_no_engine_named_in_a_plain_process_runs_one_device(tmp_path):
    result = run(script("engine_choice", "--out", str(tmp_path), "--engine", "none"), tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "engine.json").read_text()) == {
        "engine": "DeviceEngine",
        "world": 1,
    }


def test_a_single_process_engine_under_the_launcher_fails_fast_and_writes_nothing(tmp_path):
    argv = ddprun(2, "engine_choice", "--out", str(tmp_path), "--engine", "device")
    result = run(argv, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert "DeviceEngine runs one process, but this process is rank" in output
    assert "DistributedDataParallelEngine()" in output
    # one traceback (rank 0's), named once by the launcher's summary; not one per rank
    assert output.count("Traceback (most recent call last)") == 1
    assert "ddprun: rank 0 " in output
    assert not (tmp_path / "logs").exists()
    assert not (tmp_path / "engine.json").exists()
