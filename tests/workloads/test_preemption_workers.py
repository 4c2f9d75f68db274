"""Preemption while loaders use DataLoader worker processes (num_workers > 0).

A stop signal sent to the launcher (forwarded to each rank's process group) or to every process
group of the job (what ``scancel`` does: the DataLoader workers get it too) must end like the
num_workers=0 case: the ranks agree on a batch, ``last.pth`` is written mid-epoch and loads,
exit 128 + signal, no "DataLoader worker ... killed" crash, and no process of the run left,
DataLoader workers included. Real processes: ``python -m ddprun --nproc 2`` (and plain python
with a DeviceEngine), fork and spawn workers, persistent or not (scripts/preempt_workers.py).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ddprun.data.workers import shield_loader_workers
from ddprun.utils import load_checkpoint
from tests.faults.helpers import temp_files, wait_for
from tests.launcher.helpers import clean_env
from tests.workloads.helpers import ddprun, script

TRAIN_STEPS = {1: 64, 2: 32}  # train batches per epoch and rank, by number of processes


@contextmanager
def started(argv: list[str], folder: Path) -> Iterator[subprocess.Popen]:
    """Run `argv` in its own session (output to files in `folder`); on exit SIGKILL every process
    group of its process tree and of any process naming `folder` (orphans of a launcher that
    already exited), so nothing outlives the test even when it fails."""
    env = clean_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(folder / "out.txt", "w") as out, open(folder / "err.txt", "w") as err:
        process = subprocess.Popen(
            argv, cwd=folder, env=env, stdout=out, stderr=err, start_new_session=True
        )
        try:
            yield process
        finally:
            for group in process_groups(process.pid) | groups_naming(folder):
                try:
                    os.killpg(group, signal.SIGKILL)
                except OSError:
                    pass
            process.wait()


def tree(pid: int) -> list[psutil.Process]:
    """`pid` and all its live descendants (ranks, DataLoader workers, helpers)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def process_groups(pid: int) -> set[int]:
    groups = set()
    for proc in tree(pid):
        try:
            groups.add(os.getpgid(proc.pid))
        except OSError:
            pass
    return groups


def groups_naming(folder: Path) -> set[int]:
    groups, inside = set(), f"{folder}{os.sep}"
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(inside in arg for arg in proc.info["cmdline"] or []):
                groups.add(os.getpgid(proc.pid))
        except (OSError, psutil.Error):
            pass
    return groups - {os.getpgid(0)}


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running (pid reuse is ruled out by psutil's creation-time check)."""
    left = []
    for proc in processes:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(proc)
        except psutil.NoSuchProcess:
            pass
    return left


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def recorded_workers(logdir: Path) -> list[int]:
    """Pids of every DataLoader worker the run started (the script's worker_init_fn)."""
    return [int(name) for name in os.listdir(logdir / "loader_workers")]


def positions(logdir: Path, rank: int) -> list[tuple[int, int]]:
    path = logdir / f"progress_rank{rank}.txt"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [(int(w[1]), int(w[3])) for w in map(str.split, lines) if len(w) == 4]


def early_in_epoch(logdir: Path, ranks: int, epoch: int) -> bool:
    """Every rank is in epoch `epoch` or later, at train step 3 to 10: a stop agreed within
    the next two intervals (about 6 batches each) lands mid-epoch."""
    last = [positions(logdir, rank)[-1:] for rank in range(ranks)]
    return all(p and p[0][0] >= epoch and 3 <= p[0][1] <= 10 for p in last)


def check_stopped_run(
    process: subprocess.Popen, folder: Path, logdir: Path, ranks: int, sig: int, send, epoch: int
) -> None:
    """Wait until training is under way in `epoch`, `send` the signal, check how the run ended."""
    assert wait_for(lambda: early_in_epoch(logdir, ranks, epoch), 60), output(folder)
    before = tree(process.pid)
    loading = {proc.pid for proc in before} & set(recorded_workers(logdir))
    assert loading, f"no DataLoader worker running when signalled: {before}"
    sent = [positions(logdir, rank)[-1] for rank in range(ranks)]
    send(process.pid, sig)
    try:
        status = process.wait(30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running 30 s after {sig!r}:\n{output(folder)}")
    assert status == 128 + sig, output(folder)
    assert wait_for(lambda: not alive(before), 10), f"left behind: {alive(before)}"
    workers = recorded_workers(logdir)
    assert workers, "the user's worker_init_fn never ran"
    assert not [pid for pid in workers if running(pid)], "a DataLoader worker survived"
    text = output(folder)
    for crash in ("DataLoader worker", "killed by signal", "Traceback"):
        assert crash not in text, text
    folder = logdir / "checkpoints"
    state = load_checkpoint(folder / "last.pth")
    assert "model_state_dict" in state and state["model_state_dict"]
    assert state["epoch_finished"] is False, f"signalled at {sent}, saved at an epoch end"
    position = state["loader_state"]
    assert position["loader_key"] == "train"
    assert 3 <= position["loader_batch_step"] < TRAIN_STEPS[ranks], position
    assert position["global_epoch_step"] >= epoch
    stopped_at = (position["global_epoch_step"], position["loader_batch_step"])
    # every rank agreed on that batch: it is the last one each of them trained
    assert [positions(logdir, rank)[-1] for rank in range(ranks)] == [stopped_at] * ranks
    assert temp_files(folder) == []


def output(folder: Path) -> str:
    return (folder / "out.txt").read_text() + (folder / "err.txt").read_text()


def to_process(pid: int, sig: int) -> None:
    os.kill(pid, sig)


def to_every_group(pid: int, sig: int) -> None:
    """Like scancel / a container stop: every process group of the job, at once."""
    for group in process_groups(pid):
        os.killpg(group, sig)


# (signal, how it is sent, start method, persistent workers, workers per loader, signal in
# epoch): fork runs reach epoch 2 (workers restarted, or persistent ones reused); spawn workers
# take seconds to start on two busy cores, so those runs are signalled in epoch 1
LAUNCHED = [
    pytest.param(signal.SIGTERM, to_process, "fork", False, 2, 2, id="SIGTERM-launcher-fork"),
    pytest.param(signal.SIGTERM, to_every_group, "fork", True, 2, 2, id="SIGTERM-groups-fork-pers"),
    pytest.param(signal.SIGTERM, to_every_group, "spawn", False, 1, 1, id="SIGTERM-groups-spawn"),
    pytest.param(
        signal.SIGUSR1, to_every_group, "spawn", True, 1, 1, id="SIGUSR1-groups-spawn-pers"
    ),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("sig", "send", "method", "persistent", "workers", "epoch"), LAUNCHED)
def test_stop_signal_with_loader_workers_saves_and_leaves_no_process(
    tmp_path: Path, sig: int, send, method: str, persistent: bool, workers: int, epoch: int
):
    logdir = tmp_path / "run"
    args = ["--logdir", str(logdir), "--context", method, "--workers", str(workers)]
    argv = ddprun(2, "preempt_workers", *args, *(["--persistent"] if persistent else []))
    with started(argv, tmp_path) as process:
        check_stopped_run(process, tmp_path, logdir, 2, sig, send, epoch)


@pytest.mark.timeout(90)
def test_stop_signal_to_a_single_process_group_with_persistent_workers(tmp_path: Path):
    """python script.py (DeviceEngine): the group signal reaches the workers too; the run saves,
    exits 143, and its persistent workers end at interpreter exit (terminate + join)."""
    logdir = tmp_path / "run"
    argv = script("preempt_workers", "--logdir", str(logdir), "--engine", "device", "--persistent")
    with started(argv, tmp_path) as process:
        check_stopped_run(process, tmp_path, logdir, 1, signal.SIGTERM, to_every_group, 2)


@pytest.mark.timeout(90)
def test_run_that_ends_normally_leaves_no_loader_worker(tmp_path: Path):
    """Persistent workers are still alive at interpreter exit: multiprocessing's exit handler
    terminates (SIGTERM from their owner) and joins them, which must not hang."""
    logdir = tmp_path / "run"
    argv = script(
        "preempt_workers", "--logdir", str(logdir), "--engine", "device", "--persistent",
        "--epochs", "2", "--pace", "0",
    )  # fmt: skip
    with started(argv, tmp_path) as process:
        assert process.wait(60) == 0, output(tmp_path)
    workers = recorded_workers(logdir)
    assert len(workers) == 4  # two per loader, started once (persistent)
    assert wait_for(lambda: not [pid for pid in workers if running(pid)], 5)
    assert "Traceback" not in output(tmp_path)
    assert load_checkpoint(logdir / "checkpoints" / "last.pth")["epoch_finished"] is True


@pytest.mark.timeout(60)
def test_loader_workers_die_with_a_process_that_leaves_through_os_exit(tmp_path: Path):
    """No atexit, no DataLoader shutdown: the parent-death signal ends the workers at once
    (torch's own watchdog would take up to 5 s)."""
    with started(script("loader_owner_exit", str(tmp_path)), tmp_path) as process:
        assert process.wait(60) == 143, output(tmp_path)
        workers = recorded_workers(tmp_path)
        assert len(workers) == 2
        assert wait_for(lambda: not [pid for pid in workers if running(pid)], 2), workers


def shielded_loader(folder: Path, **kwargs) -> DataLoader:
    (folder / "loader_workers").mkdir(exist_ok=True)
    return DataLoader(
        TensorDataset(torch.arange(16.0)),
        batch_size=2,
        num_workers=2,
        worker_init_fn=RecordWorker(str(folder / "loader_workers")),
        **kwargs,
    )


class RecordWorker:
    def __init__(self, folder: str) -> None:
        self.folder = folder

    def __call__(self, worker_id: int) -> None:
        Path(self.folder, str(os.getpid())).touch()


@pytest.mark.timeout(60)
def test_shielded_workers_ignore_stop_signals_from_others_and_end_on_their_owners_terminate(
    tmp_path: Path,
):
    loader = shielded_loader(tmp_path, persistent_workers=True, multiprocessing_context="fork")
    user_init = loader.worker_init_fn
    shield_loader_workers({"train": loader})
    assert loader.worker_init_fn is user_init  # the user's own init function stays
    assert loader.multiprocessing_context.get_start_method() == "fork"
    assert torch.cat([b for (b,) in loader]).tolist() == list(range(16))
    workers = recorded_workers(tmp_path)
    assert len(workers) == 2
    for pid in workers:  # sent by another process, as scancel or a group signal would
        for sig in ("TERM", "USR1"):
            subprocess.run(["kill", f"-{sig}", str(pid)], check=True)
    assert torch.cat([b for (b,) in loader]).tolist() == list(range(16))  # same workers
    assert recorded_workers(tmp_path) == workers and all(map(running, workers))
    mine = [p for p in multiprocessing.active_children() if p.pid in workers]
    assert len(mine) == 2
    for process in mine:  # what DataLoader shutdown and the interpreter's exit handler send
        process.terminate()
        process.join(10)
        assert process.exitcode == 0
    del loader


def test_shield_is_idempotent_keeps_the_start_method_and_leaves_other_loaders_alone(
    tmp_path: Path,
):
    default = shielded_loader(tmp_path)
    spawn = shielded_loader(tmp_path, multiprocessing_context=multiprocessing.get_context("spawn"))
    no_workers = DataLoader(TensorDataset(torch.arange(4.0)), batch_size=2)
    loaders = {"train": default, "valid": spawn, "infer": no_workers, "other": [1, 2]}
    shield_loader_workers(loaders)
    assert default.multiprocessing_context.get_start_method() == multiprocessing.get_start_method()
    assert spawn.multiprocessing_context.get_start_method() == "spawn"
    assert no_workers.multiprocessing_context is None
    first = default.multiprocessing_context
    shield_loader_workers(loaders)  # a later stage with the same loaders: nothing changes
    assert default.multiprocessing_context is first


def test_a_custom_multiprocessing_context_is_left_alone_with_a_warning(tmp_path: Path):
    class MyContext(type(multiprocessing.get_context("fork"))):
        pass

    custom = MyContext()
    loader = shielded_loader(tmp_path, multiprocessing_context=custom)
    with pytest.warns(UserWarning, match=r"loader 'train' uses a custom multiprocessing context"):
        shield_loader_workers({"train": loader})
    assert loader.multiprocessing_context is custom
