"""Small MNIST embedding networks (Catalyst 21.12's ``catalyst.contrib.models.mnist``).

The layers sit in a ``_net`` ``nn.Sequential`` in Catalyst's order, so state dicts saved from
Catalyst's models load into these (same keys and shapes).
"""

from __future__ import annotations

import torch
from torch import nn

from ddprun.contrib.layers import Flatten, Normalize

__all__ = ["MnistBatchNormNet", "MnistSimpleNet"]

_FLAT = 64 * 12 * 12  # two 3x3 convolutions (28 -> 26 -> 24) and a 2x2 max-pool (24 -> 12)


def _check_out(out_features: int) -> None:
    if out_features < 1:
        raise ValueError(f"out_features must be >= 1, got {out_features}")


class MnistSimpleNet(nn.Module):
    """Two convolutions, a max-pool and two linear layers: ``[N, 1, 28, 28]`` to
    ``[N, out_features]``, L2-normalised when ``normalize``.

    Args:
        out_features: size of the embedding.
        normalize: end with an L2 normalisation (unit-length embeddings).
    """

    def __init__(self, out_features: int, normalize: bool = True) -> None:
        super().__init__()
        _check_out(out_features)
        layers: list[nn.Module] = [
            nn.Conv2d(1, 32, 3, 1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, 1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            Flatten(),
            nn.Linear(_FLAT, 128),
            nn.ReLU(),
            nn.Linear(128, out_features),
        ]
        if normalize:
            layers.append(Normalize())
        self._net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the embeddings of ``[N, 1, 28, 28]`` images."""
        return self._net(x)


class MnistBatchNormNet(nn.Module):
    """`MnistSimpleNet`'s shape with LeakyReLU and batch norms; not normalised.

    Args:
        out_features: size of the embedding.
    """

    def __init__(self, out_features: int) -> None:
        super().__init__()
        _check_out(out_features)
        self._net = nn.Sequential(
            nn.Conv2d(1, 32, 3, 1),
            nn.LeakyReLU(),
            nn.BatchNorm2d(32),
            nn.Conv2d(32, 64, 3, 1),
            nn.LeakyReLU(),
            nn.MaxPool2d(2),
            Flatten(),
            nn.BatchNorm1d(_FLAT),
            nn.Linear(_FLAT, 128),
            nn.LeakyReLU(),
            nn.Linear(128, out_features),
            nn.BatchNorm1d(out_features),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the embeddings of ``[N, 1, 28, 28]`` images."""
        return self._net(x)
