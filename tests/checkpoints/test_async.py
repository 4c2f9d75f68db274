"""Asynchronous checkpoint saves (issue 14.5): the snapshot, the background write, waiting,
errors, serialised saves, and a process killed mid-write."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch import nn

import ddprun.checkpoint as ckpt_io
from ddprun.checkpoint import load_checkpoint
from ddprun.checkpoint_async import AsyncCheckpointWriter, snapshot_to_cpu
from ddprun.checkpoint_manifest import verify
from ddprun.engines.engine import IEngine

SCRIPTS = Path(__file__).parent / "scripts"


def slow_save_targets(monkeypatch, delay: float, log: list | None = None) -> None:
    """Make every checkpoint write sleep `delay` seconds first (recording its interval)."""
    real = ckpt_io.save_targets

    def slow(obj, paths):
        start = time.monotonic()
        time.sleep(delay)
        result = real(obj, paths)
        if log is not None:
            log.append((start, time.monotonic()))
        return result

    monkeypatch.setattr(ckpt_io, "save_targets", slow)


# ------------------------------------------------------------------ snapshot
def test_snapshot_is_independent_of_later_updates_and_keeps_structure():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    model[1].weight = model[0].weight  # tied
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    live = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "n": [1, (2, 3)]}
    snap = snapshot_to_cpu(live)
    before = {k: v.clone() for k, v in live["model"].items()}
    with torch.no_grad():
        model[0].weight.add_(1.0)
    for buf in optimizer.state.values():
        buf["momentum_buffer"].add_(1.0)
    for key, value in before.items():
        assert torch.equal(snap["model"][key], value)
    assert not torch.equal(snap["model"]["0.weight"], live["model"]["0.weight"])
    momentum = snap["optimizer"]["state"][0]["momentum_buffer"]
    assert not torch.equal(momentum, live["optimizer"]["state"][0]["momentum_buffer"])
    tied = snap["model"]["0.weight"].untyped_storage(), snap["model"]["1.weight"].untyped_storage()
    assert tied[0].data_ptr() == tied[1].data_ptr()  # still one storage, as torch.save keeps it
    assert snap["model"]._metadata == live["model"]._metadata and snap["n"] == [1, (2, 3)]
    parameter = snapshot_to_cpu({"p": nn.Parameter(torch.ones(2))})["p"]
    assert isinstance(parameter, nn.Parameter) and parameter.requires_grad


def test_snapshot_reuses_spare_buffers_of_the_same_size():
    spare = {4000: [torch.UntypedStorage(4000)]}
    ptr = spare[4000][0].data_ptr()
    snap = snapshot_to_cpu({"w": torch.arange(1000.0)}, spare)
    assert snap["w"].untyped_storage().data_ptr() == ptr and spare[4000] == []
    assert torch.equal(snap["w"], torch.arange(1000.0))


# ------------------------------------------------------------------ engine: async
def test_async_save_blocks_much_less_than_the_write(tmp_path):
    torch.manual_seed(0)
    state = {f"w{i}": torch.randn(2048, 2048) for i in range(6)}  # 96 MiB
    engine = IEngine("cpu")
    blocked, writes = [], []
    for _ in range(3):
        state["w0"].add_(1.0)
        start = time.perf_counter()
        future = engine.save_checkpoint(state, tmp_path / "last.pth", async_=True)
        blocked.append(time.perf_counter() - start)
        future.result()
        writes.append(time.perf_counter() - start)
        engine.wait_for_checkpoint()
    # the first save allocates its buffers; later ones reuse them
    assert min(blocked) < min(writes) / 3, (blocked, writes)
    assert torch.equal(load_checkpoint(tmp_path / "last.pth")["w0"], state["w0"])


def test_async_save_writes_every_target_with_a_manifest_and_then_on_written(tmp_path):
    engine = IEngine("cpu")
    targets = [tmp_path / "last.pth", tmp_path / "best.pth"]
    seen = []
    on_written = lambda: seen.append([t.is_file() for t in targets])  # noqa: E731
    engine.save_checkpoint({"v": torch.ones(3)}, targets, async_=True, on_written=on_written)
    assert engine.checkpoint_pending
    engine.wait_for_checkpoint()
    assert not engine.checkpoint_pending and seen == [[True, True]]
    for target in targets:
        assert verify(target, require_manifest=True) == []


def test_training_may_change_the_state_while_the_write_runs(tmp_path, monkeypatch):
    slow_save_targets(monkeypatch, 0.5)
    engine = IEngine("cpu")
    weights = torch.zeros(1000)
    engine.save_checkpoint({"w": weights}, tmp_path / "last.pth", async_=True)
    weights.add_(5.0)  # the next optimizer step, while the writer sleeps
    assert torch.equal(engine.load_checkpoint(tmp_path / "last.pth")["w"], torch.zeros(1000))


def test_load_waits_for_the_pending_write(tmp_path, monkeypatch):
    engine = IEngine("cpu")
    engine.save_checkpoint({"step": 1}, tmp_path / "last.pth")
    slow_save_targets(monkeypatch, 0.5)
    engine.save_checkpoint({"step": 2}, tmp_path / "last.pth", async_=True)
    assert load_checkpoint(tmp_path / "last.pth")["step"] == 1  # plain I/O: not finished yet
    assert engine.load_checkpoint(tmp_path / "last.pth")["step"] == 2


def test_two_saves_back_to_back_run_one_after_the_other(tmp_path, monkeypatch):
    intervals: list[tuple[float, float]] = []
    slow_save_targets(monkeypatch, 0.3, intervals)
    engine = IEngine("cpu")
    engine.save_checkpoint({"step": 1}, tmp_path / "last.pth", async_=True)
    start = time.monotonic()
    engine.save_checkpoint({"step": 2}, tmp_path / "last.pth", async_=True)
    assert time.monotonic() - start >= 0.2  # the second save waited for the first write
    engine.wait_for_checkpoint()
    assert len(intervals) == 2 and intervals[0][1] <= intervals[1][0]
    assert load_checkpoint(tmp_path / "last.pth")["step"] == 2


def test_a_write_error_is_raised_by_wait_and_the_previous_file_stays(tmp_path, monkeypatch):
    engine = IEngine("cpu")
    engine.save_checkpoint({"step": 1}, tmp_path / "last.pth")

    def failing(obj, stream):
        stream.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_io.torch, "save", failing)
    engine.save_checkpoint({"step": 2}, tmp_path / "last.pth", async_=True)  # does not raise
    with pytest.raises(OSError, match="disk full"):
        engine.wait_for_checkpoint()
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["last.pth"]  # no temporary file left
    assert load_checkpoint(tmp_path / "last.pth")["step"] == 1
    engine.save_checkpoint({"step": 3}, tmp_path / "last.pth", async_=True)  # usable again
    engine.wait_for_checkpoint()
    assert load_checkpoint(tmp_path / "last.pth")["step"] == 3


def test_writer_track_adopts_an_external_future_and_hands_back_finalize():
    # a sharded backend (torch DCP's async_save) starts its own write and hands its future over
    release = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        external = pool.submit(release.wait)
        writer = AsyncCheckpointWriter()
        finalized = []
        writer.track(external, finalize=lambda: finalized.append(True))
        assert writer.pending and not external.done()
        release.set()
        finalize = writer.wait()  # joins the external write
        assert external.done() and not writer.pending and finalized == []
        finalize()  # the caller runs it after its barrier
        assert finalized == [True]
        failing = pool.submit(lambda: 1 / 0)
        writer.track(failing)
        with pytest.raises(ZeroDivisionError):
            writer.wait()


def test_engine_with_a_used_writer_still_pickles(tmp_path):
    engine = IEngine("cpu")
    engine.save_checkpoint({"v": 1}, tmp_path / "last.pth", async_=True)
    engine.wait_for_checkpoint()
    copy = pickle.loads(pickle.dumps(engine))  # spawn mode pickles the runner and its engine
    assert not copy.checkpoint_pending
    copy.save_checkpoint({"v": 2}, tmp_path / "last.pth", async_=True)
    copy.wait_for_checkpoint()
    assert load_checkpoint(tmp_path / "last.pth")["v"] == 2


# ------------------------------------------------------------------ crash
@pytest.mark.timeout(60)
def test_kill_during_an_async_write_leaves_the_previous_checkpoint_intact(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, str(SCRIPTS / "killed_writer.py"), str(tmp_path)]
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()  # blocks until half of step 2 is on disk
        assert line.strip() == "writing", line
        temporaries = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        assert len(temporaries) == 1 and temporaries[0].stat().st_size > 2 << 20
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    last = tmp_path / "last.pth"
    assert verify(last, require_manifest=True) == []
    state = load_checkpoint(last)
    assert state["step"] == 1 and torch.equal(state["w"], torch.full((1 << 20,), 1.0))
