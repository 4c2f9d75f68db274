"""Schedulers and gradient accumulation (issue 10, item 11).

scripts/accumulate.py trains an MLP with Adam, OptimizerCallback(accumulation_steps=3) and a
StepLR (gamma 0.8). One process runs it in-process (DeviceEngine); DDP runs go through the real
``python -m ddprun --nproc 2`` CLI. Checked:

- SchedulerCallback(mode="batch") steps once per optimizer step: ceil(batches / 3) times per
  epoch, at the batches where the optimizer stepped (lr values, and weights equal to a
  hand-written loop);
- ``Runner.train(scheduler=...)`` without a SchedulerCallback steps the scheduler every epoch;
- a train loader without ``len`` steps its last, partial window at loader end: the same weights
  as the sized loader over the same samples, no gradient left on the parameters;
- a run interrupted inside an accumulation window and resumed from last.pth ends bit-identical
  to the uninterrupted run (one process for several save intervals; 2 ranks with a killed rank
  and --max-restarts 1), and a resume on another world size says so once.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from ddprun import dl
from ddprun.checkpoint import load_checkpoint
from tests.runner.helpers import SupervisedRunner, linear, loaders

from .helpers import SCRIPTS, ddprun, run

GAMMA, LR = 0.8, 0.01


@pytest.fixture(scope="module")
def accumulate():
    """`main(argv)` of scripts/accumulate.py on the DeviceEngine (torch's thread count kept)."""
    spec = importlib.util.spec_from_file_location("workloads_accumulate", SCRIPTS / "accumulate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()

    def train(logdir: Path, *args: str) -> Any:
        return module.main(["--engine", "device", "--logdir", str(logdir), *args])

    train.module = module
    yield train
    torch.set_num_threads(threads)


def lrs_after_steps(steps_per_batch: list[int]) -> list[float]:
    """StepLR(gamma=0.8)'s lr after each batch, given the optimizer steps made up to it."""
    lrs, lr, done = [], LR, 0
    for steps in steps_per_batch:
        for _ in range(steps - done):
            lr *= GAMMA  # StepLR multiplies, step after step
        done = steps
        lrs.append(lr)
    return lrs


def final(logdir: Path, rank: int = 0) -> dict[str, Any]:
    return torch.load(logdir / f"final_rank{rank}.pt", weights_only=True)


def assert_bit_identical(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["model"].keys() == b["model"].keys()
    different = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not different, f"weights differ (not bit for bit) in {different}"
    assert a["lr"] == b["lr"]


def attempts(logdir: Path, rank: int) -> list[list[int]]:
    """The global train batches of each attempt in progress_rank<R>.txt."""
    runs: list[list[int]] = []
    for line in (logdir / f"progress_rank{rank}.txt").read_text().splitlines():
        if line.startswith("attempt"):
            runs.append([])
        else:
            runs[-1].append(int(line.split()[-1]))
    return runs


# ------------------------------------------------------- (a) batch mode with accumulation
@pytest.mark.timeout(60)
def test_batch_mode_scheduler_steps_once_per_optimizer_step(accumulate, tmp_path):
    # 40 samples, batch 4: 10 batches per epoch; the optimizer steps after batches 3, 6, 9
    # and 10 (the loader's last), so the scheduler steps 4 = ceil(10 / 3) times per epoch
    args = ("--train-samples", "40", "--batch-size", "4", "--epochs", "2")
    runner = accumulate(tmp_path, *args, "--scheduler", "batch")
    steps = [0, 0, 1, 1, 1, 2, 2, 2, 3, 4]
    expected = lrs_after_steps(steps + [4 + s for s in steps])
    assert [lr for _, _, lr in runner.records.lrs] == pytest.approx(expected, rel=1e-12)
    assert final(tmp_path)["lr"] == pytest.approx(LR * GAMMA**8, rel=1e-12)

    # the same training written by hand: each optimizer step uses the lr of its own step
    module = accumulate.module
    train, _ = module.datasets(40)
    model = module.make_model()
    optimizer, scheduler = module.make_optimizer(model)
    criterion = nn.CrossEntropyLoss()
    for _ in range(2):
        for index in range(10):
            x, y = train[index * 4 : index * 4 + 4]
            (criterion(model(x), y) / 3).backward()
            if (index + 1) % 3 == 0 or index == 9:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
    got = final(tmp_path)["model"]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0)


def test_batch_mode_without_accumulation_still_steps_every_batch(accumulate, tmp_path):
    args = ("--train-samples", "16", "--batch-size", "4", "--epochs", "1")
    runner = accumulate(tmp_path, *args, "--accumulation", "1", "--scheduler", "batch")
    assert [lr for _, _, lr in runner.records.lrs] == pytest.approx(
        lrs_after_steps([1, 2, 3, 4]), rel=1e-12
    )


def test_batch_mode_steps_every_batch_when_handle_batch_steps_the_optimizer():
    class OwnStepRunner(SupervisedRunner):
        def handle_batch(self, batch: Any) -> None:
            super().handle_batch(batch)
            if self.is_train_loader:
                loss = nn.functional.mse_loss(self.batch["logits"], self.batch["targets"])
                loss.backward()
                self.optimizer.step()
                self.optimizer.zero_grad()

    model = linear()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    OwnStepRunner().train(
        model=model,
        loaders=loaders(),  # 3 train batches
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5),
        callbacks={"scheduler": dl.SchedulerCallback(mode="batch")},
        engine=dl.DeviceEngine("cpu"),
        loggers={},
        num_epochs=2,
    )
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**6)


# ------------------------------------------------- (b) train(scheduler=...) steps it
@pytest.mark.timeout(60)
def test_train_steps_a_scheduler_given_without_a_scheduler_callback(accumulate, tmp_path):
    runner = accumulate(tmp_path, "--epochs", "3", "--scheduler", "default")
    assert sum(isinstance(c, dl.SchedulerCallback) for c in runner.callbacks.values()) == 1
    by_epoch = {epoch: lr for epoch, _, lr in runner.records.lrs}
    assert by_epoch == pytest.approx({1: LR, 2: LR * GAMMA, 3: LR * GAMMA**2}, rel=1e-12)
    assert runner.epoch_metrics["_epoch_"]["lr"] == pytest.approx(LR * GAMMA**3, rel=1e-12)
    assert final(tmp_path)["lr"] == pytest.approx(LR * GAMMA**3, rel=1e-12)


def test_a_given_scheduler_callback_is_the_only_one(accumulate, tmp_path):
    # 8 batches, accumulation 3: 3 optimizer steps, so 3 scheduler steps, none added per epoch
    runner = accumulate(tmp_path, "--epochs", "1", "--scheduler", "batch")
    assert sum(isinstance(c, dl.SchedulerCallback) for c in runner.callbacks.values()) == 1
    assert final(tmp_path)["lr"] == pytest.approx(LR * GAMMA**3, rel=1e-12)


def test_train_steps_every_scheduler_of_a_dict_once_per_epoch():
    model = {"a": linear(0), "b": linear(1)}
    optimizer = {k: torch.optim.SGD(m.parameters(), lr=0.1) for k, m in model.items()}
    scheduler = {
        "a": torch.optim.lr_scheduler.StepLR(optimizer["a"], step_size=1, gamma=0.5),
        "b": torch.optim.lr_scheduler.StepLR(optimizer["b"], step_size=1, gamma=0.1),
    }

    class TwoModels(SupervisedRunner):
        def handle_batch(self, batch: Any) -> None:
            features, targets = batch
            logits = self.model["a"](features) + self.model["b"](features)
            self.batch = {"logits": logits, "targets": targets}

    TwoModels().train(
        model=model,
        loaders=loaders(),
        criterion=nn.MSELoss(),
        optimizer=optimizer,
        scheduler=scheduler,
        callbacks={
            "criterion": dl.CriterionCallback("logits", "targets"),
            "optimizer": dl.OptimizerCallback(),
        },
        engine=dl.DeviceEngine("cpu"),
        loggers={},
        num_epochs=2,
    )
    assert optimizer["a"].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**2)
    assert optimizer["b"].param_groups[0]["lr"] == pytest.approx(0.1 * 0.1**2)


def test_train_with_reduce_on_plateau_follows_the_valid_metric_or_names_the_missing_loader():
    def train(valid_loader: str) -> torch.optim.Optimizer:
        model = linear()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=0)
        SupervisedRunner().train(
            model=model,
            loaders=loaders(),
            criterion=nn.MSELoss(),
            optimizer=optimizer,
            scheduler=plateau,
            callbacks={"criterion": dl.CriterionCallback("logits", "targets")},
            engine=dl.DeviceEngine("cpu"),
            loggers={},
            num_epochs=3,
            valid_loader=valid_loader,
        )
        return optimizer

    # no OptimizerCallback: the valid loss is the same every epoch, so patience 0 halves the lr
    # after epochs 2 and 3
    assert train("valid").param_groups[0]["lr"] == pytest.approx(0.025)
    with pytest.raises(ValueError, match=r"loader_key='holdout'.*have \['train', 'valid'\]"):
        train("holdout")


# ---------------------------------------------------- (c) a train loader without len
@pytest.mark.timeout(60)
def test_loader_without_len_steps_its_last_partial_window_at_loader_end(accumulate, tmp_path):
    # 28 samples, batch 4: 7 batches; windows 1-3, 4-6 and 7, stepped at loader end
    args = ("--train-samples", "28", "--batch-size", "4", "--epochs", "2", "--scheduler", "batch")
    stream = accumulate(tmp_path / "iterable", *args, "--iterable")
    sized = accumulate(tmp_path / "sized", *args)
    with pytest.raises(TypeError):
        len(stream.loaders["train"])  # really no len
    assert [b for e, b, _ in stream.records.lrs] == list(range(1, 8)) * 2
    assert stream.records.grads_cleared == [True, True]  # nothing leaks into the next epoch
    assert sized.records.grads_cleared == [True, True]
    assert_bit_identical(final(tmp_path / "iterable"), final(tmp_path / "sized"))
    # the loader-end step is an optimizer step: the batch scheduler follows it (3 per epoch)
    assert final(tmp_path / "iterable")["lr"] == pytest.approx(LR * GAMMA**6, rel=1e-12)
    assert stream.epoch_metrics["train"]["lr"] == pytest.approx(LR * GAMMA**6, rel=1e-12)


# ----------------------------------------- (d) resume inside an accumulation window
@pytest.fixture(scope="module")
def reference(accumulate, tmp_path_factory: pytest.TempPathFactory) -> Path:
    logdir = tmp_path_factory.mktemp("accumulate") / "reference"
    accumulate(logdir, "--shuffle")  # 128 samples, batch 16: 8 batches per epoch, 3 epochs
    return logdir


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("save_every", "crash_at", "saved_at", "accumulated"),
    [
        (2, 11, 10, 2),  # epoch 2, batch 2: two batches of the window 1-3 accumulated
        (4, 13, 12, 1),  # epoch 2, batch 4: the first batch of the window 4-6
        (3, 15, 14, 0),  # epoch 2, batch 6: a step batch, nothing accumulated
    ],
)
def test_resume_inside_an_accumulation_window_is_bit_exact(
    accumulate, reference, tmp_path, save_every, crash_at, saved_at, accumulated
):
    every = ("--shuffle", "--save-every", str(save_every))
    with pytest.raises(RuntimeError, match=f"injected fault at batch {crash_at}"):
        accumulate(tmp_path, *every, "--fault", "raise", "--fault-batch", str(crash_at))
    last = tmp_path / "checkpoints" / "last.pth"
    state = load_checkpoint(last)
    assert state["global_batch_step"] == saved_at
    saved = state["loader_state"]["ranks"][0]["grads"]
    assert (saved is not None) == (accumulated > 0)

    resumed = accumulate(tmp_path, *every, "--resume", str(last))
    assert attempts(tmp_path, 0)[1] == list(range(saved_at + 1, 25))
    first = resumed.records.first_grads  # what the resumed run started its window with
    for name, value in first.items():
        if saved is None:
            assert value is None, name
        else:
            assert torch.equal(value, saved["model"][name]), name
    assert_bit_identical(final(reference), final(tmp_path))


@pytest.mark.timeout(60)
def test_resume_of_a_loader_without_len_inside_a_window_is_bit_exact(accumulate, tmp_path):
    args = ("--train-samples", "28", "--batch-size", "4", "--epochs", "2", "--iterable")
    accumulate(tmp_path / "straight", *args)
    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="injected fault at batch 12"):
        accumulate(crashed, *args, "--save-every", "4", "--fault", "raise", "--fault-batch", "12")
    accumulate(crashed, *args, "--resume", str(crashed / "checkpoints" / "last.pth"))
    assert attempts(crashed, 0)[1] == list(range(12, 15))  # saved at epoch 2, batch 4
    assert_bit_identical(final(tmp_path / "straight"), final(crashed))


# ------------------------------------------------------------------------- 2 ranks
# 256 samples, 2 ranks x batch 16, unshuffled: each step sees the samples one process sees with
# batch 32. Train loaders end after 7 of their 8 batches (--stop-at 7), so under DDP too the last
# window (batch 7) is open at loader end and stepped there, its rank-local gradients averaged.
# Epoch 2 runs global batches 8-14; last.pth every 2 loader batches is written at its batch 2
# (global 9, two batches into the window 1-3); rank 1 dies at global 10.
DDP_ARGS = ("--train-samples", "256", "--stop-at", "7")


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ddp_reference")
    result = run(ddprun(2, "accumulate", "--logdir", str(folder), *DDP_ARGS), folder, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return folder


@pytest.mark.timeout(150)
def test_ddp_accumulation_matches_one_process(ddp_reference, accumulate, tmp_path):
    accumulate(tmp_path, "--train-samples", "256", "--stop-at", "7", "--batch-size", "32")
    one, two = final(tmp_path), final(ddp_reference)
    for key, value in one["model"].items():
        torch.testing.assert_close(two["model"][key], value, rtol=1e-5, atol=1e-6)
    assert two["lr"] == pytest.approx(one["lr"], rel=1e-12)  # 3 steps per epoch in both
    assert one["lr"] == pytest.approx(LR * GAMMA**9, rel=1e-12)
    assert_bit_identical(final(ddp_reference, 0), final(ddp_reference, 1))


@pytest.mark.timeout(150)
def test_ddp_killed_rank_resumes_inside_the_window_bit_for_bit(ddp_reference, tmp_path):
    logdir = tmp_path / "run"
    argv = ddprun(2, "accumulate", "--logdir", str(logdir), *DDP_ARGS, "--save-every", "2",
                  "--fault", "sigkill", "--fault-rank", "1", "--fault-batch", "10",
                  "--first-attempt-only")  # fmt: skip
    argv[argv.index("--nproc") : argv.index("--nproc")] = ["--max-restarts", "1"]
    result = run(argv, tmp_path, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    for rank in (0, 1):
        first, second = attempts(logdir, rank)
        assert first == list(range(1, 10))  # rank 0 waits in batch 10's gradient all-reduce
        assert second == list(range(10, 22))  # right after the save at 9, in the window
    assert_bit_identical(final(ddp_reference), final(logdir))
    assert_bit_identical(final(logdir, 0), final(logdir, 1))


def _two_ranks_fail_at_batch_10(tmp_path: Path) -> tuple[Path, Path]:
    """2 ranks, last.pth every 2 batches, rank 1 raises at batch 10: (logdir, last.pth)."""
    logdir = tmp_path / "run"
    argv = ddprun(2, "accumulate", "--logdir", str(logdir), *DDP_ARGS, "--save-every", "2",
                  "--fault", "raise", "--fault-rank", "1", "--fault-batch", "10")  # fmt: skip
    result = run(argv, tmp_path, timeout=120)
    assert result.returncode != 0 and "injected fault at batch 10" in result.stderr
    last = logdir / "checkpoints" / "last.pth"
    return logdir, last


@pytest.mark.timeout(150)
def test_resume_on_another_world_size_averages_the_window_and_warns_once(accumulate, tmp_path):
    logdir, last = _two_ranks_fail_at_batch_10(tmp_path)
    ranks = load_checkpoint(last)["loader_state"]["ranks"]
    assert len(ranks) == 2
    saved = [r["grads"]["model"] for r in ranks]
    assert not torch.equal(saved[0]["0.weight"], saved[1]["0.weight"])  # rank-local

    with pytest.warns(UserWarning) as warned:
        resumed = accumulate(
            logdir, *DDP_ARGS, "--batch-size", "32", "--resume", str(last), "--epochs", "3"
        )
    messages = [str(w.message) for w in warned if "accumulation" in str(w.message)]
    assert len(messages) == 1, messages
    assert "by 2 rank(s) and resumes on 1" in messages[0] and str(last) in messages[0]
    for name, value in resumed.records.first_grads.items():
        assert torch.equal(value, (saved[0][name] + saved[1][name]) / 2), name
    assert all(math.isfinite(v) for t in final(logdir)["model"].values() for v in t.flatten())


@pytest.mark.timeout(150)
def test_a_position_that_cannot_carry_over_continues_at_the_next_epoch(accumulate, tmp_path):
    # issue 14: 2 ranks x 8 batches of 16 seen; one process with batches of 48 cannot continue
    # at a whole batch, so it says so once and starts the next epoch
    logdir, last = _two_ranks_fail_at_batch_10(tmp_path)
    saved = load_checkpoint(last)
    assert not saved["epoch_finished"]
    with pytest.warns(UserWarning) as warned:
        accumulate(logdir, *DDP_ARGS, "--batch-size", "48", "--resume", str(last), "--epochs", "3")
    messages = [str(w.message) for w in warned if "cannot carry over" in str(w.message)]
    assert len(messages) == 1 and "next epoch" in messages[0] and str(last) in messages[0]
    assert not any("accumulation" in str(w.message) for w in warned)  # no window carried
    resumed = load_checkpoint(last)
    assert resumed["epoch_finished"] and resumed["global_epoch_step"] == 3
    assert resumed["global_batch_step"] > saved["global_batch_step"]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
