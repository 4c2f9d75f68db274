"""Datasets for demos and tests: MNIST (IDX files) and Digits (bundled with scikit-learn)."""

from ddprun.contrib.datasets.digits import Digits
from ddprun.contrib.datasets.mnist import MNIST

__all__ = ["MNIST", "Digits"]
