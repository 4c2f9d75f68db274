"""A stand-in runner for logger tests: only the attributes loggers read."""

from __future__ import annotations

from types import SimpleNamespace

import pytest


def fake_runner(**overrides: object) -> SimpleNamespace:
    """Returns a runner-like object with every counter a logger reads."""
    state: dict[str, object] = {
        "stage_key": "train",
        "stage_epoch_step": 1,
        "stage_epoch_len": 3,
        "global_epoch_step": 1,
        "global_batch_step": 10,
        "global_sample_step": 320,
        "loader_key": "train",
        "loader_batch_step": 10,
        "loader_batch_len": 10,
    }
    state.update(overrides)
    return SimpleNamespace(**state)


@pytest.fixture
def runner() -> SimpleNamespace:
    """A fresh fake runner at epoch 1 of stage ``train``."""
    return fake_runner()


@pytest.fixture
def make_runner():
    """The ``fake_runner`` factory, for tests that step through several epochs or stages."""
    return fake_runner
