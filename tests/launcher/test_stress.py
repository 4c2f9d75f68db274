"""Ten short 2-rank gloo jobs in a row must all exit 0 (the exit-time SIGABRT regression test).

The script ends right after its last all-reduce and never destroys its process group, which
under plain torchrun aborted with "terminate called without an active exception" in about one
run in three on a 2-core machine (see `ddprun.distributed.shutdown_process_group`).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from .helpers import run_ddprun, write_script

ENDS_AFTER_COLLECTIVES = """\
dist.init_process_group(backend="gloo")
t = torch.ones(4)
for _ in range(3):
    dist.all_reduce(t)
print(f"rank {RANK} sum {t[0].item()}", flush=True)
"""

RUNS = 10


@pytest.mark.timeout(120)
def test_ten_runs_in_a_row_all_exit_zero(tmp_path: Path) -> None:
    script = write_script(tmp_path, "collectives.py", ENDS_AFTER_COLLECTIVES)
    start = time.monotonic()
    failures = []
    for run in range(RUNS):
        folder = tmp_path / f"run{run}"
        folder.mkdir()
        result = run_ddprun(folder, "--nproc", "2", "--logdir", folder / "logs", script, timeout=60)
        if result.returncode != 0 or "rank 0 sum 8.0" not in result.stdout:
            failures.append((run, result.returncode, result.output[-2000:]))
    assert not failures, failures
    print(f"{RUNS} runs in {time.monotonic() - start:.1f} s")
