"""Workers exit like Python programs, and rank 0's console is faithful (issue 11, items 3 and 5).

Real processes through the real CLI (``python -m ddprun``) and spawn mode (``python script.py``):
exit handlers and unclosed files on success and failure; rank 0's stdout/stderr order, carriage
returns on the console (raw bytes) and in the rank log, a terminal for rank 0 under a pty, and
``--tee`` prefixes.
"""

from __future__ import annotations

import os
import select
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ddprun.launch.streams import final_lines

from .helpers import (
    clean_env,
    ddprun_argv,
    kill_everything,
    run_ddprun,
    worker_processes,
    write_script,
)

UNCLOSED_BYTES = b"x" * 100_000 + b"END"

# Ends right after its last collective, with a DDP model alive and nothing torn down: the
# script an exit-time gloo abort hit. Leaves a file unclosed and registers an exit handler.
LEAVES_THINGS_OPEN = """\
import atexit
dist.init_process_group(backend="gloo")
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
model(torch.ones(3, 4)).sum().backward()
unclosed = open(f"unclosed{RANK}.txt", "w")  # never closed: only finalization flushes it
unclosed.write("x" * 100_000 + "END")
atexit.register(lambda: open(f"atexit{RANK}.txt", "w").write(f"ran {RANK}"))
t = torch.ones(4)
for _ in range(3):
    dist.all_reduce(t)
print(f"rank {RANK} sum {t[0].item()}", flush=True)
if RANK == 1 and sys.argv[1] == "raise":
    raise ValueError("boom-after-writing")
if RANK == 1 and sys.argv[1] == "exit":
    sys.exit(3)
"""


def _assert_left_complete(folder: Path, rank: int) -> None:
    assert (folder / f"unclosed{rank}.txt").read_bytes() == UNCLOSED_BYTES
    assert (folder / f"atexit{rank}.txt").read_text() == f"ran {rank}"


@pytest.mark.timeout(180)
@pytest.mark.parametrize(("mode", "status"), [("ok", 0), ("raise", 1), ("exit", 1)])
def test_exit_handlers_run_and_unclosed_files_are_complete(
    tmp_path: Path, mode: str, status: int
) -> None:
    script = write_script(tmp_path, "leaves_open.py", LEAVES_THINGS_OPEN)
    result = run_ddprun(
        tmp_path, "--nproc", "2", "--logdir", tmp_path / "logs", script, mode, timeout=150
    )
    assert result.returncode == status, result.output
    assert "rank 0 sum 8.0" in result.stdout
    assert "terminate called" not in result.output and "SIGABRT" not in result.output
    _assert_left_complete(tmp_path, 1)  # the failing rank too
    if status == 0:
        _assert_left_complete(tmp_path, 0)
    else:
        assert "ddprun: rank 1 (" in result.stderr, result.output
        assert "ddprun: rank 0 (" not in result.stderr, result.output
    assert worker_processes(str(tmp_path)) == []


SPAWN_SCRIPT = """\
import atexit, os, sys
import torch
from torch.utils.data import DataLoader, TensorDataset
from ddprun import dl


def mark(path, rank):
    with open(path, "w") as fp:
        fp.write(f"ran {rank}")


class LeavesThingsOpen(dl.Callback):
    def __init__(self, fail):
        super().__init__(order=0)
        self.fail = fail

    def on_experiment_start(self, runner):
        rank = int(os.environ["RANK"])
        self.unclosed = open(f"unclosed{rank}.txt", "w")  # never closed
        self.unclosed.write("x" * 100_000 + "END")
        atexit.register(mark, f"atexit{rank}.txt", rank)

    def on_epoch_end(self, runner):
        if self.fail and int(os.environ["RANK"]) == 1:
            raise ValueError("boom-in-spawned-rank")


class Plain(dl.Runner):
    def handle_batch(self, batch):
        x, y = batch
        self.batch = {"features": x, "targets": y, "logits": self.model(x)}


if __name__ == "__main__":
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))
    model = torch.nn.Linear(4, 2)
    Plain().train(
        model=model,
        criterion=torch.nn.CrossEntropyLoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loaders={"train": DataLoader(data, batch_size=8), "valid": DataLoader(data, batch_size=8)},
        engine=dl.DistributedDataParallelEngine(world_size=2),
        callbacks=[
            dl.CriterionCallback(input_key="logits", target_key="targets", metric_key="loss"),
            dl.OptimizerCallback(metric_key="loss"),
            LeavesThingsOpen(fail=sys.argv[1] == "raise"),
        ],
        loggers={},
        num_epochs=1,
        logdir="logs",
        verbose=False,
    )
    print("parent done", flush=True)
"""


def _run(argv: list[str], cwd: Path, timeout: float) -> tuple[int, bytes]:
    """Run `argv` in its own session (stdout+stderr into one file); kill it and its workers."""
    out_path = cwd / "console.bin"
    with open(out_path, "wb") as out:
        process = subprocess.Popen(
            argv,
            cwd=cwd,
            env=clean_env(OMP_NUM_THREADS="1"),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code = process.wait(timeout)
        except subprocess.TimeoutExpired:
            code = -9
        finally:
            kill_everything(process, str(cwd))
    return code, out_path.read_bytes()


@pytest.mark.timeout(180)
@pytest.mark.parametrize(("mode", "status"), [("ok", 0), ("raise", 1)])
def test_spawn_mode_workers_exit_like_python_programs(
    tmp_path: Path, mode: str, status: int
) -> None:
    (tmp_path / "spawn_open.py").write_text(SPAWN_SCRIPT)
    code, output = _run([sys.executable, "spawn_open.py", mode], tmp_path, timeout=150)
    text = output.decode(errors="replace")
    assert code == status, text
    assert "terminate called" not in text
    _assert_left_complete(tmp_path, 1)
    if status == 0:
        _assert_left_complete(tmp_path, 0)
        assert "parent done" in text
    else:
        assert "DDP worker rank 1 failed" in text and "boom-in-spawned-rank" in text


# Interleaved stdout/stderr lines, then a progress bar redrawn with carriage returns.
CONSOLE = """\
print(f"tty out={sys.stdout.isatty()} err={sys.stderr.isatty()} rank={RANK}", flush=True)
try:
    print(f"size={os.get_terminal_size(1).columns}x{os.get_terminal_size(1).lines}", flush=True)
except OSError:
    print("size=none", flush=True)
for i in range(6):
    print(f"out-{i}", flush=True)
    print(f"err-{i}", file=sys.stderr, flush=True)
for i in range(1, 6):
    sys.stdout.write(f"\\rbar {i}/5 {'#' * i}")
    sys.stdout.flush()
    time.sleep(0.02)
sys.stdout.write("\\n")
print("done", flush=True)
"""
INTERLEAVED = b"".join(b"out-%d\nerr-%d\n" % (i, i) for i in range(6))
BAR = b"".join(b"\rbar %d/5 %s" % (i, b"#" * i) for i in range(1, 6)) + b"\n"


def _rank_log_lines(logs: Path, rank: int) -> list[str]:
    return (logs / "ranks" / f"rank{rank}.log").read_text().splitlines()[1:]  # after the header


@pytest.mark.timeout(180)
def test_rank0_console_keeps_order_and_carriage_returns(tmp_path: Path) -> None:
    script = write_script(tmp_path, "console.py", CONSOLE)
    logs = tmp_path / "logs"
    code, output = _run(ddprun_argv("--nproc", "2", "--logdir", logs, script), tmp_path, 150)
    assert code == 0, output
    # stdout and stderr went to one file: rank 0's lines in the order it wrote them, and the
    # bar's redraws byte for byte (no carriage return turned into a newline)
    assert b"tty out=False err=False rank=0\nsize=none\n" + INTERLEAVED + BAR + b"done\n" in output
    assert b"rank=1" not in output
    lines = _rank_log_lines(logs, 0)
    assert lines[2:] == [f"{s}-{i}" for i in range(6) for s in ("out", "err")] + [
        "bar 5/5 #####",
        "done",
    ]
    # rank 1's log: every line once, the bar once in its final state
    other = _rank_log_lines(logs, 1)
    assert [line for line in other if line.startswith("bar")] == ["bar 5/5 #####"]
    assert sorted(line for line in other if line[:4] in ("out-", "err-")) == sorted(
        f"{s}-{i}" for i in range(6) for s in ("out", "err")
    )


@pytest.mark.timeout(180)
def test_rank0_sees_a_terminal_when_the_launcher_has_one(tmp_path: Path) -> None:
    import fcntl
    import pty
    import termios

    script = write_script(tmp_path, "console.py", CONSOLE)
    logs = tmp_path / "logs"
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 111, 0, 0))
    process = subprocess.Popen(
        ddprun_argv("--nproc", "2", "--logdir", logs, script),
        cwd=tmp_path,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
        # the launcher leads a session whose controlling terminal is this pty, as in a shell
        preexec_fn=lambda: os.login_tty(slave),
        pass_fds=(slave,),
    )
    os.close(slave)
    chunks: list[bytes] = []
    reader = threading.Thread(target=_read_until_closed, args=(master, chunks), daemon=True)
    reader.start()
    try:
        code = process.wait(150)
    finally:
        kill_everything(process, str(tmp_path))
        reader.join(10)
        os.close(master)
    output = b"".join(chunks)
    assert code == 0, output
    # the test's terminal turns "\n" into "\r\n" (ONLCR), as a user's terminal would
    assert b"tty out=True err=True rank=0\r\nsize=111x33\r\n" in output, output
    assert INTERLEAVED.replace(b"\n", b"\r\n") + BAR.replace(b"\n", b"\r\n") in output
    assert _rank_log_lines(logs, 0)[:2] == ["tty out=True err=True rank=0", "size=111x33"]
    assert _rank_log_lines(logs, 1)[0] == "tty out=False err=False rank=1"


def _read_until_closed(fd: int, chunks: list[bytes]) -> None:
    while True:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if not ready:
            continue
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO: every process holding the terminal is gone
            return
        if not data:
            return
        chunks.append(data)


@pytest.mark.timeout(180)
def test_tee_prefixes_every_rank_line_by_line(tmp_path: Path) -> None:
    script = write_script(tmp_path, "console.py", CONSOLE)
    result = run_ddprun(
        tmp_path, "--nproc", "2", "--tee", "3", "--logdir", tmp_path / "logs", script, timeout=150
    )
    assert result.returncode == 0, result.output
    for rank in (0, 1):
        out = [line for line in result.stdout.splitlines() if line.startswith(f"[rank{rank}]: ")]
        err = [line for line in result.stderr.splitlines() if line.startswith(f"[rank{rank}]: ")]
        assert f"[rank{rank}]: tty out=False err=False rank={rank}" in out
        assert [line for line in out if "out-" in line] == [
            f"[rank{rank}]: out-{i}" for i in range(6)
        ]
        assert err == [f"[rank{rank}]: err-{i}" for i in range(6)]
        assert [line for line in out if "bar" in line] == [f"[rank{rank}]: bar 5/5 #####"]
    assert "\r" not in result.output


@pytest.mark.timeout(10)
def test_rank_log_lines_keep_the_final_state_of_redrawn_lines() -> None:
    tqdm_like = b"".join(b"\r%3d%%|%s|" % (p, b"#" * (p // 10)) for p in range(0, 101, 10))
    assert final_lines(b"a\n" + tqdm_like + b"\nb\r\n") == [b"a", b"100%|##########|", b"b"]
    assert final_lines(b"half\rdone") == [b"done"]  # unfinished last line: kept
    assert final_lines(b"x\r\r\n\n") == [b"x", b""]
    # a rank log is fed what each read returned: redraws split anywhere
    from ddprun.launch.streams import Lines

    stream = Lines()
    chunks = [b"\r1", b"0%\r2", b"0%", b"\r30%", b"\r", b"\n", b"next\r", b"\r\n"]
    assert [line for chunk in chunks for line in stream.feed(chunk)] == [b"30%", b"next"]


# One process, one rank: the teardown's parts on a real gloo group with a DDP model.
TEARDOWN_PARTS = """\
import gc, os, sys
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=sys.argv[1])
from ddprun import process_exit
if sys.argv[2] == "armed":
    process_exit.arm()
import torch, torch.distributed as dist
dist.init_process_group("gloo")
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
model(torch.ones(1, 2)).sum().backward()
t = torch.ones(3)
dist.all_reduce(t)
print("threads", len(process_exit._runloop_threads()))
print("idle", process_exit._wait_until_backend_idle(5.0, True))
print("released", process_exit.release_process_groups(wait_for_peers=True))
del model
gc.collect()
print("left", len(process_exit._runloop_threads()))
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("mode", "left"), [("armed", 0), ("plain", 2)])
def test_teardown_waits_for_idle_gloo_threads_and_frees_the_group(
    tmp_path: Path, mode: str, left: int
) -> None:
    from ddprun.distributed import find_free_port

    (tmp_path / "parts.py").write_text(TEARDOWN_PARTS)
    argv = [sys.executable, "parts.py", str(find_free_port()), mode]
    code, output = _run(argv, tmp_path, timeout=100)
    text = output.decode()
    assert code == 0, text
    assert "threads 2\nidle True\nreleased True\n" in text  # gloo's two worker threads
    # armed before the group exists, torch.distributed.nn.functional's defaults do not pin
    # the group: once the DDP model is gone its threads are joined; unarmed they live on
    assert f"left {left}\n" in text
