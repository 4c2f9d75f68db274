"""Fixtures for the data tests: the synthetic MNIST writer, loaded by path."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest


def _load_synthetic_mnist() -> ModuleType:
    # Loaded by file path, so the tests work whatever ends up on sys.path (tests/ is no package).
    path = Path(__file__).resolve().parents[1] / "synthetic_mnist.py"
    spec = importlib.util.spec_from_file_location("ddprun_tests_synthetic_mnist", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def synthetic() -> ModuleType:
    """The ``tests/synthetic_mnist.py`` module (``make_synthetic_mnist``, ``write_idx``)."""
    return _load_synthetic_mnist()
