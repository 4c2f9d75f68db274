from __future__ import annotations

import torch

from ddprun.loggers import ConsoleLogger


def test_loader_line_sorted_and_rounded(capsys, runner):
    runner.stage_key, runner.loader_key = "train_freezed", "valid"
    metrics = {"loss": torch.tensor(0.123456), "accuracy01": 0.961234, "support/class_00": 980.0}
    ConsoleLogger(per_class=True).log_metrics(metrics, "loader", runner)
    out = capsys.readouterr().out
    assert out == (
        "valid (1/3) [stage train_freezed] | accuracy01: 0.9612 | loss: 0.1235"
        " | support/class_00: 980\n"
    )


def test_per_class_metrics_left_out_by_default(capsys, runner):
    metrics = {"f1/_macro": 0.5, "f1/class_00": 0.25, "support/class_00": 980.0}
    ConsoleLogger().log_metrics(metrics, "loader", runner)
    assert capsys.readouterr().out.endswith("| f1/_macro: 0.5\n")


def test_batch_scope_prints_nothing(capsys, runner):
    ConsoleLogger().log_metrics({"loss": 1.0}, "batch", runner)
    assert capsys.readouterr().out == ""


def test_epoch_scope_prints_only_epoch_level_values(capsys, runner):
    logger = ConsoleLogger()
    logger.log_metrics({"train": {"loss": 1.0}, "valid": {"loss": 2.0}}, "epoch", runner)
    assert capsys.readouterr().out == ""
    logger.log_metrics({"train": {"loss": 1.0}, "_epoch_": {"lr": 0.001}}, "epoch", runner)
    assert capsys.readouterr().out == "* Epoch (1/3) [stage train] | lr: 0.001\n"


def test_hparams_only_when_asked(capsys, runner):
    ConsoleLogger().log_hparams({"lr": 0.1}, runner)
    assert capsys.readouterr().out == ""
    ConsoleLogger(log_hparams=True).log_hparams({"lr": 0.1, "bs": 32}, runner)
    assert capsys.readouterr().out == "Hparams | bs: 32 | lr: 0.1\n"
