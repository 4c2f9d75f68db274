"""Image transforms under Catalyst 21.12's names (``catalyst.contrib.data.transforms``).

``ImageToTensor`` and ``NormalizeImage`` are ddprun's ``ToTensor`` and ``Normalize``
(``ddprun.data.transforms``) under the names Catalyst 21.11+ gives them, so a pipeline written
for Catalyst and one written for ddprun produce the same tensors. Decisions where the two
differ: the output is always float32 (Catalyst keeps a float64 array float64), a 2-D or 3-D
torch tensor is accepted as well as a numpy array, and a bad shape raises ``TypeError`` naming
the shape (Catalyst raises ``ValueError`` for a wrong number of dimensions).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ddprun.data.transforms import Compose, Normalize, ToTensor

__all__ = ["Compose", "ImageToTensor", "NormalizeImage", "image_to_tensor", "normalize_image"]


class ImageToTensor(ToTensor):
    """Turns an HxW or HxWxC image into a float32 CxHxW tensor; uint8 is scaled to [0, 1]."""

    def __repr__(self) -> str:
        return "ImageToTensor()"


class NormalizeImage(Normalize):
    """Normalises a CxHxW tensor per channel: ``(x - mean[c]) / std[c]`` (out of place unless
    ``inplace``).

    Args:
        mean: one value per channel, or one for all channels.
        std: one value per channel, or one for all channels; none may be zero.
        inplace: modify the input tensor instead of returning a new one.
    """

    def __repr__(self) -> str:
        mean, std = self.mean.flatten().tolist(), self.std.flatten().tolist()
        return f"NormalizeImage(mean={mean}, std={std})"


def image_to_tensor(pic: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Returns ``ImageToTensor()(pic)``: a float32 CxHxW tensor (uint8 scaled to [0, 1])."""
    return ToTensor()(pic)


def normalize_image(
    tensor: torch.Tensor,
    mean: float | Sequence[float],
    std: float | Sequence[float],
    inplace: bool = False,
) -> torch.Tensor:
    """Returns ``NormalizeImage(mean, std, inplace)(tensor)`` for one CxHxW tensor."""
    return Normalize(mean, std, inplace=inplace)(tensor)
