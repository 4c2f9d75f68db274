"""The launcher names the rank that failed first, not its echoes (issue 11, item 4).

Real 2-rank jobs through ``python -m ddprun``: rank 1 fails, rank 0 then fails of the lost
connection ("Connection closed by peer"); both scripts catch their error and call ``sys.exit(1)``
themselves, as hydra and click do, so torch writes no error file. Plus the restart line, and the
root-cause choice on hand-made records.
"""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from ddprun.launch.failures import choose_root_failure, restart_reason

from .helpers import run_ddprun, worker_processes, write_script

FAILS_ON_RANK_1 = """\
import traceback

def main():
    dist.init_process_group(backend="gloo")
    t = torch.ones(1)
    dist.all_reduce(t)
    if RANK == 1:
        raise ValueError("real-error-on-rank-1")
    for _ in range(600):  # rank 0 fails here once rank 1 is gone
        dist.all_reduce(t)
        time.sleep(0.05)
"""

# hydra's way: print the error inside the except block, then sys.exit(1) there
HANDLED_IN_EXCEPT = (
    FAILS_ON_RANK_1
    + """
try:
    main()
except Exception:
    traceback.print_exc()
    sys.exit(1)
"""
)

# sys.exit after the except block: the worker cannot see which exception it was
HANDLED_LATER = (
    FAILS_ON_RANK_1
    + """
failed = None
try:
    main()
except Exception as exc:
    failed = exc
    print(f"error: {exc}", flush=True)
if failed is not None:
    sys.exit(1)
"""
)


def _assert_rank1_named(result, logs: Path) -> None:
    assert result.returncode == 1, result.output
    assert "ddprun: rank 1 (local_rank: 1" in result.stderr, result.output
    assert "ddprun: rank 0 (" not in result.stderr, result.output
    summary = result.stderr[result.stderr.index("ddprun: rank 1 (") :]
    # rank 1 is not on the console: its last output lines are shown, with its real error
    assert f"last lines of {logs / 'ranks' / 'rank1.log'}:" in summary, summary
    assert "real-error-on-rank-1" in summary, summary


@pytest.mark.timeout(180)
@pytest.mark.parametrize("repeat", range(3))
def test_rank_that_exits_after_catching_its_error_is_named(tmp_path: Path, repeat: int) -> None:
    script = write_script(tmp_path, "hydra_like.py", HANDLED_IN_EXCEPT)
    logs = tmp_path / "logs"
    result = run_ddprun(tmp_path, "--nproc", "2", "--logdir", logs, script, timeout=150)
    _assert_rank1_named(result, logs)
    # the handled error is named too (the exception sys.exit was called while handling)
    assert "ValueError: real-error-on-rank-1" in result.stderr.split("ddprun: rank 1 (")[1]
    assert worker_processes(str(tmp_path)) == []


@pytest.mark.timeout(180)
def test_rank_that_exits_later_without_its_exception_is_named(tmp_path: Path) -> None:
    script = write_script(tmp_path, "exits_later.py", HANDLED_LATER)
    logs = tmp_path / "logs"
    result = run_ddprun(tmp_path, "--nproc", "2", "--logdir", logs, script, timeout=150)
    _assert_rank1_named(result, logs)
    assert "error: real-error-on-rank-1" in result.stderr


RESTARTS = """\
attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
dist.init_process_group(backend="gloo")
if attempt == 0 and RANK == 1:
    if sys.argv[1] == "raise":
        raise RuntimeError("first attempt fails")
    try:
        raise KeyError("missing-config")
    except KeyError:
        sys.exit(2)
t = torch.ones(1)
dist.all_reduce(t)
print(f"done-{attempt}-rank-{RANK}", flush=True)
"""


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("mode", "reason"),
    [("raise", "RuntimeError: first attempt fails"), ("handled", "KeyError: 'missing-config'")],
)
def test_restart_says_which_rank_failed_and_why(tmp_path: Path, mode: str, reason: str) -> None:
    script = write_script(tmp_path, "restarts.py", RESTARTS)
    logs = tmp_path / "logs"
    result = run_ddprun(
        tmp_path, "--nproc", "2", "--max-restarts", "1", "--logdir", logs, script, mode,
        timeout=200,
    )  # fmt: skip
    assert result.returncode == 0, result.output
    line = (
        f"ddprun: rank 1 failed ({reason}); restarting all of them (restart 1 of 1); "
        f"see {logs / 'ranks'}"
    )
    assert line in result.stderr.splitlines(), result.output
    assert len(re.findall(r"restarting", result.output)) == 1
    assert "done-1-rank-0" in result.stdout


def _failure(tmp_path: Path, local_rank: int, exitcode: int, extra: dict | None,
             message: str = "X: y", callstack: str = "") -> ProcessFailure:  # fmt: skip
    error_file = tmp_path / f"error{local_rank}.json"
    if extra is not None:
        info = {"py_callstack": callstack, "timestamp": str(int(extra["time"])), "ddprun": extra}
        error_file.write_text(json.dumps({"message": {"message": message, "extraInfo": info}}))
    return ProcessFailure(
        local_rank=local_rank, pid=100 + local_rank, exitcode=exitcode, error_file=str(error_file)
    )


@pytest.mark.timeout(10)
def test_an_unknown_error_is_an_echo_when_the_output_shows_a_lost_peer(tmp_path: Path) -> None:
    (tmp_path / "rank0.log").write_text("step 3\nerror: [pair.cc:553] Connection closed by peer\n")
    (tmp_path / "rank1.log").write_text("step 3\nerror: disk full\n")

    def rank_log(rank: int) -> str:
        return str(tmp_path / f"rank{rank}.log")

    # rank 0 was detected first and exited in the same second: only its output tells
    failures = {
        0: _failure(tmp_path, 0, 1, {"time": 1000.0, "collateral": None}, "exit status 1"),
        1: _failure(tmp_path, 1, 1, {"time": 1000.0, "collateral": None}, "exit status 1"),
    }
    assert choose_root_failure(failures).rank == 0  # without the output: first detected
    assert choose_root_failure(failures, rank_log).rank == 1
    assert restart_reason(failures, rank_log) == "rank 1 failed (exit status 1)"


@pytest.mark.timeout(10)
def test_a_rank_stopped_after_saving_is_never_the_root_cause(tmp_path: Path) -> None:
    failures = {
        0: _failure(tmp_path, 0, 128 + signal.SIGTERM, None),  # the runner saved and stopped
        1: _failure(tmp_path, 1, 1, {"time": 1000.5, "collateral": False}, "ValueError: v"),
    }
    root = choose_root_failure(failures)
    assert root.rank == 1
    assert restart_reason(failures) == "rank 1 failed (ValueError: v)"
    killed = {3: _failure(tmp_path, 3, -signal.SIGKILL, None)}
    assert restart_reason(killed) == "rank 3 failed (killed by SIGKILL)"
