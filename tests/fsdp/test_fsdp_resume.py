"""FSDP runs stop, die and resume like DDP runs (slow: several launches, one with a restart).

scripts/train.py, 3 epochs of 8 batches (2 ranks, batch 16), Adam: a reference run; a run
whose rank 1 SIGKILLs itself at global batch 11 while ``last`` is written every 2 batches, under
``--max-restarts 1``; resumes of the reference's epoch-2 checkpoints on another world size and
from a file checkpoint; a SIGTERM to the launcher; and fp16 parameters.
"""

from __future__ import annotations

import importlib.util
import signal
import time
from pathlib import Path

import pytest
import torch

from ddprun.checkpoint import load_checkpoint
from ddprun.checkpoint_manifest import verify
from tests.launcher.helpers import clean_env, launched, read_output, wait_until

from .helpers import TRAIN, ddprun, max_difference, metrics, run, weights

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

KILL_AT, SAVED_AT, LAST_BATCH = 11, 10, 24


def _batches(logdir: Path, rank: int) -> dict[int, list[int]]:
    """{attempt: [global batches]} from progress_rank<R>.txt."""
    found: dict[int, list[int]] = {}
    attempt = -1
    for line in (logdir / f"progress_rank{rank}.txt").read_text().splitlines():
        words = line.split()
        if len(words) == 2 and words[0] == "attempt":
            attempt = int(words[1])
            found[attempt] = []
        elif len(words) == 4 and words[2] == "batch":  # a line being written is skipped
            found[attempt].append(int(words[3]))
    return found


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    logdir = tmp_path_factory.mktemp("reference")
    result = run(ddprun(2, TRAIN, "--logdir", logdir, "--epochs", "3"), logdir, 150)
    assert result.returncode == 0, result.stdout[-4000:]
    return logdir


def test_killed_rank_restarts_from_the_last_saved_batch_bit_for_bit(reference, tmp_path):
    logdir = tmp_path / "restarted"
    argv = ddprun(
        2, TRAIN, "--logdir", logdir, "--epochs", "3", "--save-every", "2",
        "--fault-batch", str(KILL_AT), launcher=["--max-restarts", "1"],
    )  # fmt: skip
    result = run(argv, logdir, 200)
    assert result.returncode == 0, result.stdout[-4000:]
    assert "restarting all of them (restart 1 of 1)" in result.stdout
    assert (logdir / "fault_rank1.txt").is_file()
    for rank in (0, 1):
        batches = _batches(logdir, rank)
        assert batches[0] == list(range(1, KILL_AT))
        assert batches[1] == list(range(SAVED_AT + 1, LAST_BATCH + 1))  # from the saved batch
    final, straight = weights(logdir), weights(reference)
    assert all(torch.equal(final[k], straight[k]) for k in straight), "not bit for bit"
    for loader, values in metrics(reference).items():
        for key, value in values.items():
            assert metrics(logdir)[loader][key] == pytest.approx(value, rel=1e-9), (loader, key)


def test_a_folder_written_by_two_ranks_resumes_on_one(reference, tmp_path):
    """Epoch 2's folder resumes under ``ddprun --nproc 1`` (FSDP on one rank, batch 32, with
    CPU offload, which changes nothing on a CPU rank)."""
    source = reference / "run" / "checkpoints" / "train.2"
    logdir = tmp_path / "one"
    argv = ddprun(1, TRAIN, "--logdir", logdir, "--epochs", "3", "--batch-size", "32",
                  "--resume", source, "--cpu-offload")  # fmt: skip
    result = run(argv, logdir, 150)
    assert result.returncode == 0, result.stdout[-4000:]
    assert _batches(logdir, 0)[0][0] == 17  # epoch 3 only (8 batches of 32 per epoch)
    assert max_difference(weights(logdir), weights(reference)) <= 1e-5


def test_a_folder_written_by_two_ranks_resumes_on_three(reference, tmp_path):
    """N=2 -> M=3 (an elastic scale-up): weights and Adam state reshard, counters continue
    (epoch 3 starts at global batch 17 on every rank), the run ends like the reference's
    within the difference a 48-sample global batch makes."""
    source = reference / "run" / "checkpoints" / "train.2"
    logdir = tmp_path / "three"
    argv = ddprun(3, TRAIN, "--logdir", logdir, "--epochs", "3", "--resume", source)
    result = run(argv, logdir, 200)
    assert result.returncode == 0, result.stdout[-4000:]
    for rank in (0, 1, 2):
        batches = _batches(logdir, rank)[0]
        assert batches[0] == 17 and len(batches) == 6, batches  # ceil(256 / 3 / 16) batches
    assert [row for row in metrics(logdir)] == [row for row in metrics(reference)]
    resumed, straight = metrics(logdir)["valid"]["loss"], metrics(reference)["valid"]["loss"]
    assert resumed == pytest.approx(straight, rel=0.1)
    assert 0 < max_difference(weights(logdir), weights(reference)) < 0.05


def test_async_saves_under_fsdp_change_nothing_and_publish_verified_folders(reference, tmp_path):
    logdir = tmp_path / "async"
    argv = ddprun(2, TRAIN, "--logdir", logdir, "--epochs", "3", "--save-every", "2",
                  "--async-save")  # fmt: skip
    result = run(argv, logdir, 200)
    assert result.returncode == 0, result.stdout[-4000:]
    final, straight = weights(logdir), weights(reference)
    assert all(torch.equal(final[k], straight[k]) for k in straight)
    folder = logdir / "run" / "checkpoints"
    for name in ("last", "best", "train.3"):
        assert (folder / name / "manifest.json").is_file(), name
        assert verify(folder / name) == [], name
    assert not list(folder.glob(".*.tmp"))
    saved = load_checkpoint(folder / "last")["model_state_dict"]  # consolidated, no group
    assert set(saved) == set(final) and all(torch.equal(saved[k], final[k]) for k in final)


def test_fsdp_resumes_from_a_one_process_file_checkpoint(reference, tmp_path):
    """A ``.pth`` file (full states, torch's numbered optimizer state) loads into sharded
    components on 2 ranks."""
    spec = importlib.util.spec_from_file_location("fsdp_train_script", TRAIN)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    single = tmp_path / "single"
    script.main(["--engine", "device", "--logdir", str(single), "--epochs", "2"])
    logdir = tmp_path / "resumed"
    source = single / "run" / "checkpoints" / "train.2.pth"
    argv = ddprun(2, TRAIN, "--logdir", logdir, "--epochs", "3", "--resume", source)
    result = run(argv, logdir, 150)
    assert result.returncode == 0, result.stdout[-4000:]
    assert max_difference(weights(logdir), weights(reference)) <= 1e-5


def test_sigterm_saves_the_last_folder_and_stops(tmp_path):
    logdir = tmp_path / "run"
    args = ("--nproc", "2", TRAIN, "--logdir", logdir, "--epochs", "50", "--save-every", "2",
            "--pace", "0.05")  # fmt: skip
    env = clean_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with launched(tmp_path, *args, env=env) as process:

        def started() -> bool:
            return all(
                (logdir / f"progress_rank{r}.txt").is_file()
                and len(_batches(logdir, r).get(0, [])) >= 4
                for r in (0, 1)
            )

        assert wait_until(started, 90), read_output(tmp_path)
        recorded = max(max(_batches(logdir, r)[0]) for r in (0, 1))
        process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert process.returncode == 143, read_output(tmp_path)
    folder = logdir / "run" / "checkpoints"
    state = load_checkpoint(folder / "last")
    assert state["global_batch_step"] >= recorded
    assert not list(folder.glob(".*.tmp")) and not list(folder.glob(".*.old"))


def test_fp16_parameters_with_the_sharded_grad_scaler(tmp_path):
    logdir = tmp_path / "fp16"
    argv = ddprun(2, TRAIN, "--logdir", logdir, "--param-dtype", "fp16", "--reduce-dtype", "fp32",
                  "--accumulate", "2", "--clip", "1.0")  # fmt: skip
    result = run(argv, logdir, 150)
    assert result.returncode == 0, result.stdout[-4000:]
    state = load_checkpoint(logdir / "run" / "checkpoints" / "last")
    assert state["scaler_state_dict"]["scale"] > 0
    assert all(t.dtype == torch.float32 for t in state["model_state_dict"].values())
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics(logdir)["train"].values())
