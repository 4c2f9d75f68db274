"""Fixtures for the seed scripts: a working folder holding small synthetic MNIST files."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from synthetic_mnist import make_synthetic_mnist  # noqa: E402

SCRIPTS = Path(__file__).parent / "scripts"


@pytest.fixture
def mnist_cwd(tmp_path, monkeypatch):
    """A fresh working directory with MNIST files, as the seed scripts expect (os.getcwd())."""
    make_synthetic_mnist(tmp_path, n_train=640, n_test=320, seed=0)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_seed(name: str) -> dict:
    """Run a seed script in-process as __main__ and return its globals."""
    return runpy.run_path(str(SCRIPTS / f"{name}.py"), run_name="__main__")
