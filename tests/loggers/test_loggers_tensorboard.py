from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from ddprun.loggers import TensorboardLogger

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    EventAccumulator,
)


def _events(path):
    accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def test_scalars_per_loader_at_global_epoch(tmp_path, make_runner):
    logger = TensorboardLogger(tmp_path)
    for epoch in (1, 2):
        for loader in ("train", "valid"):
            runner = make_runner(loader_key=loader, global_epoch_step=epoch)
            logger.log_metrics(
                {"loss": torch.tensor(epoch / 10), "accuracy01": 0.5}, "loader", runner
            )
        logger.log_metrics({"_epoch_": {"lr": 0.1 / epoch}, "train": {}}, "epoch", runner)
    logger.close_log()
    for loader in ("train", "valid"):
        loss = _events(tmp_path / "tensorboard" / loader).Scalars("loss")
        assert [(e.step, round(e.value, 6)) for e in loss] == [(1, 0.1), (2, 0.2)]
    lr = _events(tmp_path / "tensorboard" / "_epoch_").Scalars("lr")
    assert [(e.step, round(e.value, 6)) for e in lr] == [(1, 0.1), (2, 0.05)]


def test_batch_metrics_only_when_enabled(tmp_path, make_runner):
    runner = make_runner(global_sample_step=64)
    off = TensorboardLogger(tmp_path / "off")
    off.log_metrics({"loss": 1.0}, "batch", runner)
    off.close_log()
    assert not (tmp_path / "off").exists()  # nothing created, not even a writer
    on = TensorboardLogger(tmp_path / "on", log_batch_metrics=True)
    on.log_metrics({"loss": 1.0}, "batch", runner)
    on.close_log()
    events = _events(tmp_path / "on" / "tensorboard" / "train")
    assert [e.step for e in events.Scalars("loss/batch")] == [64]


def test_images_numpy_hwc_and_tensor_chw(tmp_path, runner):
    logger = TensorboardLogger(tmp_path)
    logger.log_image("confusion", np.zeros((4, 5, 3), np.uint8), "loader", runner)
    logger.log_image("weights", torch.rand(1, 4, 5), "loader", runner)
    with pytest.raises(TypeError, match="2-D or 3-D"):
        logger.log_image("bad", np.zeros(3), "loader", runner)
    logger.flush_log()
    logger.close_log()
    events = _events(tmp_path / "tensorboard" / "train")
    assert set(events.Tags()["images"]) == {"confusion", "weights"}
    image = events.Images("confusion")[0]
    assert (image.width, image.height, image.step) == (5, 4, 1)


def test_pickles_without_writers(tmp_path, runner):
    logger = TensorboardLogger(tmp_path)
    logger.log_metrics({"loss": 1.0}, "loader", runner)
    clone = pickle.loads(pickle.dumps(logger))
    assert clone._writers == {} and clone.logdir == logger.logdir
    logger.close_log()


def test_importing_loggers_does_not_import_tensorboard():
    code = (
        "import sys, ddprun.loggers, ddprun.data, ddprun.contrib.datasets; "
        "bad = [m for m in sys.modules if m.startswith(('tensorboard', 'torch.utils.tensorboard', 'sklearn'))]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
