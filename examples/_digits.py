"""Shared by the examples: Digits loaders (8x8 images, 10 classes, offline) and CLI flags."""

import argparse

from torch.utils.data import DataLoader

from ddprun.contrib.datasets import Digits
from ddprun.data.transforms import ToTensor


def digits_loaders(batch_size: int = 32) -> dict:
    """{"train", "valid"} loaders over scikit-learn's bundled digits."""
    return {
        "train": DataLoader(
            Digits(train=True, transform=ToTensor()), batch_size=batch_size, shuffle=True
        ),
        "valid": DataLoader(Digits(train=False, transform=ToTensor()), batch_size=batch_size),
    }


def parse_args(description: str, logdir: str) -> argparse.Namespace:
    """--logdir and --epochs, with the example's defaults."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--logdir", default=logdir)
    parser.add_argument("--epochs", type=int, default=5)
    return parser.parse_args()
