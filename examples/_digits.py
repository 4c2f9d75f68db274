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
    """--logdir, --epochs and --batch-size, with the example's defaults."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--logdir", default=logdir)
    parser.add_argument("--epochs", type=int, default=5)
    add_batch_size(parser)
    return parser.parse_args()


def add_batch_size(parser: argparse.ArgumentParser) -> None:
    """--batch-size: per process, so `ddprun --nproc N` trains with N times that globally."""
    parser.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="batch size per process (under `ddprun --nproc N` the global batch is N times it)",
    )
