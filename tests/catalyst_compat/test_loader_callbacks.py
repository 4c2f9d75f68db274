"""Catalyst 21.12's PeriodicLoaderCallback and BatchOverfitCallback (issue 12, item 4): which
loaders ran in which epoch, batch counts, the same batches every epoch, the loaders restored,
skipped valid epochs with checkpoints and early stopping, errors. DDP: test_control_callbacks.py."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from ddprun import dl
from ddprun.callbacks._access import SkippedLoaderMetrics
from tests.catalyst_compat.control_helpers import Passes, StepRunner, data, losses, train


# --------------------------------------------------------------- PeriodicLoader
def _three_loaders():
    return {
        "train": DataLoader(data(), 8),
        "train_extra": DataLoader(data(16, 2), 8),
        "valid": DataLoader(data(20, 1), 8),
    }


def test_periodic_loaders_run_every_nth_epoch_and_come_back():
    passes = Passes()
    loaders = _three_loaders()
    periodic = dl.PeriodicLoaderCallback("valid", "loss_ce", minimize=True, train_extra=2, valid=3)
    runner = train([*losses(), periodic, passes, dl.OptimizerCallback("loss_ce")], loaders, 6)
    ran = [(e, k) for e, k, _ in passes.ran()]
    assert ran == [
        (1, "train"), (2, "train"), (2, "train_extra"), (3, "train"), (3, "valid"),
        (4, "train"), (4, "train_extra"), (5, "train"), (6, "train"), (6, "train_extra"),
        (6, "valid"),
    ]  # fmt: skip
    assert list(runner.loaders) == list(loaders)  # the stage's loaders again after each epoch
    assert all(list(seen) == list(loaders) for seen in passes.loaders_at_epoch_end)
    valid = runner.epoch_metrics["valid"]  # epoch 6 ran it: real values
    assert not isinstance(valid, SkippedLoaderMetrics) and math.isfinite(valid["loss_ce"])


@pytest.mark.parametrize(("minimize", "worst"), [(True, math.inf), (False, -math.inf)])
def test_skipped_valid_epoch_gets_the_worst_value(minimize, worst):
    periodic = dl.PeriodicLoaderCallback("valid", "loss_ce", minimize=minimize, valid=2)
    runner = train([*losses(), periodic, dl.OptimizerCallback("loss_ce")], num_epochs=3)
    assert runner.epoch_metrics["valid"] == {"loss_ce": worst}


def test_periodic_with_checkpoint_early_stopping_and_plateau(tmp_path):
    """Skipped valid epochs: no crash (also for a metric the skipped epoch lacks), never the
    best checkpoint; early stopping (patience 1, NaN for the missing accuracy) and a plateau
    scheduler (patience 0, +inf) do not count them, else they would act at epoch 1."""
    lrs = []

    class LearningRate(dl.Callback):
        def __init__(self):
            super().__init__(order=dl.CallbackOrder.ExternalExtra)

        def on_epoch_end(self, runner):
            lrs.append(runner.optimizer.param_groups[0]["lr"])

    periodic = dl.PeriodicLoaderCallback("valid", "loss_ce", minimize=True, valid=2)
    callbacks = [
        *losses(),
        dl.AccuracyCallback("logits", "targets"),
        periodic,
        dl.OptimizerCallback("loss_ce"),
        dl.CheckpointCallback(tmp_path / "loss", "valid", "loss_ce", save_n_best=2),
        dl.CheckpointCallback(tmp_path / "acc", "valid", "accuracy01", minimize=False),
        dl.EarlyStoppingCallback(1, "valid", "accuracy01", minimize=False, min_delta=-1.0),
        dl.SchedulerCallback(loader_key="valid", metric_key="loss_ce"),
        LearningRate(),
    ]
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    runner = StepRunner()
    runner.train(
        model=model,
        criterion={"ce": nn.CrossEntropyLoss(), "bce": nn.BCEWithLogitsLoss()},
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0),
        loaders={"train": DataLoader(data(), 8), "valid": DataLoader(data(20, 1), 8)},
        callbacks=callbacks,
        loggers={},
        num_epochs=4,
    )
    assert runner.stage_epoch_step == 4 and lrs[:3] == [0.1, 0.1, 0.1]
    book = json.loads((tmp_path / "loss" / "checkpoints" / "_metrics.json").read_text())
    assert book["best"]["epoch"] in (2, 4) and {r["epoch"] for r in book["checkpoints"]} == {2, 4}
    assert book["last"]["epoch"] == 4
    book = json.loads((tmp_path / "acc" / "checkpoints" / "_metrics.json").read_text())
    assert book["best"]["epoch"] in (2, 4) and book["last"]["epoch"] == 4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"valid": 0}, "valid loader 'valid' needs a period >= 1"),
        ({"train": -1}, "period of 'train' must be a whole number >= 0"),
        ({"train": "2"}, "period of 'train' must be a whole number"),
    ],
)
def test_periodic_bad_periods_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dl.PeriodicLoaderCallback("valid", "loss", **kwargs)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (("valid", "loss"), {"valid_other": 2}, r"no loader \['valid_other'\] in stage 'train'"),
        (("vaild", "loss"), {}, "valid_loader_key='vaild' is not a loader"),
        (("valid", "loss"), {"train": 2, "valid": 2}, "no loader runs in epoch 1"),
    ],
)
def test_periodic_loaders_checked_at_stage_start(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        train([*losses(), dl.PeriodicLoaderCallback(*args, **kwargs)], num_epochs=2)


# ----------------------------------------------------------------- BatchOverfit
def test_overfit_replays_the_same_first_batches_every_epoch():
    passes = Passes()
    loaders = {
        "train": DataLoader(data(), 8, shuffle=True),
        "valid": DataLoader(data(40, 1), 8),
        "valid_other": DataLoader(data(40, 2), 8),
    }

    class InPlace(dl.Callback):  # changes the batch tensors: the next epoch must not see it
        def __init__(self):
            super().__init__(order=dl.CallbackOrder.Internal)

        def on_batch_start(self, runner):
            runner.batch[2].add_(1000)

    overfit = dl.BatchOverfitCallback(train=2, valid=0.5)
    runner = train(
        [*losses(), overfit, passes, InPlace(), dl.OptimizerCallback("loss_ce")],
        loaders,
        num_epochs=3,
    )
    counts = {(e, k): len(ids) for e, k, ids in passes.passes}
    per_loader = {"train": 16, "valid": 16, "valid_other": 8}  # 2 batches, half of 5, 1
    assert counts == {(e, k): n for e in (1, 2, 3) for k, n in per_loader.items()}
    by_loader = {}
    for _, key, ids in passes.passes:
        by_loader.setdefault(key, []).append(ids)
    for key, epochs in by_loader.items():
        assert epochs[0] == epochs[1] == epochs[2], key
        assert all(i >= 1000 for i in epochs[0])  # each epoch's +1000 applied to fresh copies
        assert all(i < 2000 for i in epochs[0])
    assert by_loader["valid"][0] == [i + 1000 for i in range(16)]
    # the stage's loaders after every epoch (callbacks after it see them) and after the run
    assert all(seen == passes.stage_loaders for seen in passes.loaders_at_epoch_end)
    assert runner.loaders == passes.stage_loaders and len(passes.loaders_at_epoch_end) == 3


def test_overfit_and_periodic_compose_in_either_order():
    for first_overfit in (True, False):
        loaders = _three_loaders()
        overfit = dl.BatchOverfitCallback()
        periodic = dl.PeriodicLoaderCallback("valid", "loss_ce", train_extra=2)
        pair = [overfit, periodic] if first_overfit else [periodic, overfit]
        passes = Passes()
        runner = train([*losses(), *pair, passes, dl.OptimizerCallback("loss_ce")], loaders, 3)
        assert passes.ran() == [
            (1, "train", 8), (1, "valid", 8), (2, "train", 8), (2, "train_extra", 8),
            (2, "valid", 8), (3, "train", 8), (3, "valid", 8),
        ]  # fmt: skip
        assert runner.loaders == loaders


class _Stream(IterableDataset):
    def __iter__(self):
        return iter(data(16))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"train": 0}, "BatchOverfitCallback: train must be a whole number >= 1, got 0"),
        ({"train": 1.5}, r"train=1.5 must be a number of batches >= 1 or a fraction"),
        ({"train": "1"}, "BatchOverfitCallback: train must be a whole number"),
    ],
)
def test_overfit_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dl.BatchOverfitCallback(**kwargs)


def test_overfit_loader_checks_at_stage_and_epoch_start():
    with pytest.raises(ValueError, match=r"no loader \['vaild'\] in stage 'train'"):
        train([*losses(), dl.BatchOverfitCallback(vaild=2)])
    stream = {"train": DataLoader(_Stream(), 8), "valid": DataLoader(data(), 8)}
    with pytest.raises(ValueError, match="fraction, but loader 'train' has no length"):
        train([*losses(), dl.BatchOverfitCallback(train=0.5)], stream)
    passes = Passes()  # a number of batches works without a length
    train(
        [*losses(), dl.BatchOverfitCallback(train=1), passes, dl.OptimizerCallback("loss_ce")],
        {"train": DataLoader(_Stream(), 8), "valid": DataLoader(data(), 8)},
    )
    assert passes.ran() == [(1, "train", 8), (1, "valid", 8), (2, "train", 8), (2, "valid", 8)]
