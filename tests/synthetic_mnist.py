"""Writes small, learnable, MNIST-shaped IDX files so tests never need the network.

Each class is a fixed random 28x28 stroke pattern (drawn from ``seed``); an item is its class's
pattern, randomly dimmed, plus Gaussian noise, clipped to uint8. The classes are linearly
separable up to the noise, so a linear model gets well above chance in an epoch.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

__all__ = ["make_synthetic_mnist", "write_idx"]

SIDE = 28
NUM_CLASSES = 10
FLIP_SHARE = 0.02


def write_idx(path: str | os.PathLike[str], array: np.ndarray, gz: bool = False) -> Path:
    """Writes a uint8 array as an IDX file (``.gz`` appended to the name when ``gz``).

    Args:
        path: target file, without the ``.gz`` suffix.
        array: uint8 data of any number of dimensions.
        gz: gzip the file.

    Returns:
        The path written.
    """
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    payload = header + array.tobytes()
    path = Path(f"{path}.gz" if gz else path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload, mtime=0) if gz else payload)
    return path


def _templates(rng: np.random.Generator) -> np.ndarray:
    """Returns one sparse 28x28 stroke pattern per class (float, 0..255).

    The patterns share a common base and differ in a few pixels each, so the task is learnable but
    not solved by the first batch.
    """
    base = rng.random((SIDE, SIDE)) < 0.2
    flips = rng.random((NUM_CLASSES, SIDE, SIDE)) < FLIP_SHARE
    return np.logical_xor(base, flips).astype(np.float64) * 255.0


def _samples(
    templates: np.ndarray, count: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``count`` noisy images of random classes and their labels."""
    labels = rng.integers(0, NUM_CLASSES, size=count)
    scale = rng.uniform(0.6, 1.0, size=(count, 1, 1))
    noise = rng.normal(0.0, 100.0, size=(count, SIDE, SIDE))
    images = np.clip(templates[labels] * scale + noise, 0, 255).astype(np.uint8)
    return images, labels.astype(np.uint8)


def make_synthetic_mnist(
    root: str | os.PathLike[str],
    n_train: int = 1200,
    n_test: int = 400,
    gz: bool = False,
    seed: int = 0,
) -> Path:
    """Writes the four MNIST IDX files under ``root/MNIST/raw``.

    Args:
        root: dataset root, as passed to ``MNIST(root)``.
        n_train: number of training items.
        n_test: number of test items.
        gz: write ``.gz`` files instead of plain ones.
        seed: fixes the class patterns and every sample.

    Returns:
        ``root`` as a Path (ready for ``MNIST(root)``).
    """
    raw = Path(root) / "MNIST" / "raw"
    templates = _templates(np.random.default_rng(seed))
    # Separate streams so changing n_train leaves the test set unchanged.
    train_rng, test_rng = (np.random.default_rng([seed, part]) for part in (1, 2))
    for prefix, count, rng in (("train", n_train, train_rng), ("t10k", n_test, test_rng)):
        images, labels = _samples(templates, count, rng)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images, gz=gz)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels, gz=gz)
    return Path(root)
