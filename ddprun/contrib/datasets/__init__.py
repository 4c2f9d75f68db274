"""Datasets for demos and tests: MNIST (IDX files) and the metric-learning datasets derived from
it, and Digits (bundled with scikit-learn)."""

from ddprun.contrib.datasets.digits import Digits
from ddprun.contrib.datasets.mnist import MNIST
from ddprun.contrib.datasets.mnist_ml import MnistMLDataset, MnistQGDataset, PartialMNIST

__all__ = ["MNIST", "Digits", "MnistMLDataset", "MnistQGDataset", "PartialMNIST"]
