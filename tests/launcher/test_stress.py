"""Ten short 2-rank gloo jobs in a row must all exit 0 and keep their files (the exit-time
SIGABRT regression test).

The script ends right after its last all-reduce, with a DDP model alive, and never destroys its
process group, which under plain torchrun aborted with "terminate called without an active
exception" in about one run in three on a 2-core machine (see `ddprun.process_exit`). Workers
exit through normal interpreter finalization, so the file it never closes must be complete and
its `atexit` handler must have run, in every run.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from .helpers import run_ddprun, write_script

ENDS_AFTER_COLLECTIVES = """\
import atexit
dist.init_process_group(backend="gloo")
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
model(torch.ones(3, 4)).sum().backward()
unclosed = open(f"unclosed{RANK}.txt", "w")  # never closed
unclosed.write("x" * 100_000 + "END")
atexit.register(lambda: open(f"atexit{RANK}.txt", "w").write("ran"))
t = torch.ones(4)
for _ in range(3):
    dist.all_reduce(t)
print(f"rank {RANK} sum {t[0].item()}", flush=True)
"""

RUNS = 10


def _read(path: Path) -> bytes | None:
    return path.read_bytes() if path.exists() else None


def _kept_files(folder: Path) -> bool:
    """Both ranks' unclosed file is complete and their exit handler ran."""
    return all(
        _read(folder / f"unclosed{rank}.txt") == b"x" * 100_000 + b"END"
        and _read(folder / f"atexit{rank}.txt") == b"ran"
        for rank in (0, 1)
    )


@pytest.mark.slow  # a stress test: CI runs it after the default suite (-m slow)
@pytest.mark.timeout(300)
def test_ten_runs_in_a_row_all_exit_zero(tmp_path: Path) -> None:
    script = write_script(tmp_path, "collectives.py", ENDS_AFTER_COLLECTIVES)
    start = time.monotonic()
    failures = []
    for run in range(RUNS):
        folder = tmp_path / f"run{run}"
        folder.mkdir()
        result = run_ddprun(folder, "--nproc", "2", "--logdir", folder / "logs", script, timeout=60)
        kept = _kept_files(folder)
        if result.returncode != 0 or "rank 0 sum 8.0" not in result.stdout or not kept:
            failures.append((run, result.returncode, kept, result.output[-2000:]))
    assert not failures, failures
    print(f"{RUNS} runs in {time.monotonic() - start:.1f} s")
