from __future__ import annotations

import csv

import pytest
import torch

from ddprun.loggers import CSVLogger


def _rows(path):
    with path.open(newline="") as stream:
        return list(csv.reader(stream))


def _log_epoch(logger, runner, metrics):
    logger.log_metrics(metrics, "epoch", runner)


def test_layout_header_and_rows(tmp_path, make_runner):
    logger = CSVLogger(tmp_path)
    for epoch in (1, 2):
        runner = make_runner(stage_epoch_step=epoch, global_epoch_step=epoch)
        metrics = {
            "train": {"loss": 1.0 / epoch, "accuracy01": torch.tensor(0.5)},
            "valid": {"loss": 2.0},
        }
        _log_epoch(logger, runner, metrics)
    logger.close_log()
    assert _rows(tmp_path / "logs" / "train.csv") == [
        ["step", "accuracy01", "loss"],
        ["1", "0.5", "1.0"],
        ["2", "0.5", "0.5"],
    ]
    assert _rows(tmp_path / "logs" / "valid.csv") == [["step", "loss"], ["1", "2.0"], ["2", "2.0"]]


def test_other_scopes_and_empty_epoch_entry_write_nothing(tmp_path, runner):
    logger = CSVLogger(tmp_path)
    logger.log_metrics({"loss": 1.0}, "batch", runner)
    logger.log_metrics({"loss": 1.0}, "loader", runner)
    _log_epoch(logger, runner, {"train": {"loss": 1.0}, "_epoch_": {}})
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["train.csv"]
    _log_epoch(logger, runner, {"_epoch_": {"lr": 0.01}})
    assert _rows(tmp_path / "logs" / "_epoch_.csv") == [["step", "lr"], ["1", "0.01"]]


def test_header_once_across_instances_and_stages(tmp_path, make_runner):
    # stage 1: epochs 1-2, stage 2 (a new logger instance, as in a new process): epochs 1-2 again
    steps = [("stage1", 1, 1), ("stage1", 2, 2), ("stage2", 1, 3), ("stage2", 2, 4)]
    for stage, stage_epoch, global_epoch in steps:
        logger = CSVLogger(tmp_path)  # a fresh instance every epoch is the harshest case
        runner = make_runner(
            stage_key=stage, stage_epoch_step=stage_epoch, global_epoch_step=global_epoch
        )
        _log_epoch(logger, runner, {"valid": {"loss": float(global_epoch)}})
    rows = _rows(tmp_path / "logs" / "valid.csv")
    assert rows[0] == ["step", "loss"]
    assert [r[0] for r in rows[1:]] == ["1", "2", "3", "4"]  # step = global epoch
    assert sum(r == ["step", "loss"] for r in rows) == 1


def test_widening_rewrites_header_and_keeps_rows_aligned(tmp_path, make_runner):
    logger = CSVLogger(tmp_path)
    _log_epoch(logger, make_runner(global_epoch_step=1), {"train": {"loss": 1.0}})
    _log_epoch(
        logger, make_runner(global_epoch_step=2), {"train": {"loss": 0.5, "accuracy01": 0.9}}
    )
    _log_epoch(logger, make_runner(global_epoch_step=3), {"train": {"loss": 0.25}})
    assert _rows(tmp_path / "logs" / "train.csv") == [
        ["step", "accuracy01", "loss"],
        ["1", "", "1.0"],
        ["2", "0.9", "0.5"],
        ["3", "", "0.25"],
    ]
    assert not [p for p in (tmp_path / "logs").iterdir() if p.name.endswith(".tmp")]


def test_no_postfix_and_hparams(tmp_path, runner):
    logger = CSVLogger(tmp_path, use_logdir_postfix=False)
    _log_epoch(logger, runner, {"train": {"loss": 1.0}})
    logger.log_hparams({"lr": 0.1}, runner)
    assert (tmp_path / "train.csv").is_file() and (tmp_path / "hparams.json").is_file()


def test_non_scalar_values_are_skipped_with_a_warning(tmp_path, runner):
    with pytest.warns(UserWarning, match="matrix"):
        _log_epoch(CSVLogger(tmp_path), runner, {"train": {"loss": 1.0, "matrix": torch.eye(2)}})
    assert _rows(tmp_path / "logs" / "train.csv")[0] == ["step", "loss"]
