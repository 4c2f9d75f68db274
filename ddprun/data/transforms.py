"""Small image transforms: ``ToTensor``, ``Normalize`` and ``Compose``.

They cover what the MNIST and Digits demos need without torchvision. Every transform is a plain
class (no lambdas), so datasets that hold them can be pickled into DataLoader workers and spawned
processes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["Compose", "Normalize", "ToTensor"]


def _as_float_hwc(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Returns ``image`` as a float32 tensor in HxWxC layout, scaled to [0, 1] if it was uint8."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 and not np.issubdtype(image.dtype, np.floating):
            raise TypeError(f"ToTensor expects a uint8 or float array, got dtype {image.dtype}")
        # astype copies, so the result never aliases the dataset's (possibly read-only) buffer.
        tensor = torch.from_numpy(image.astype(np.float32))
        is_uint8 = image.dtype == np.uint8
    else:
        if image.dtype != torch.uint8 and not image.is_floating_point():
            raise TypeError(f"ToTensor expects a uint8 or float tensor, got dtype {image.dtype}")
        tensor = image.to(torch.float32)
        is_uint8 = image.dtype == torch.uint8
    if is_uint8:
        tensor = tensor / 255.0
    return tensor if tensor.dim() == 3 else tensor.unsqueeze(-1)


class ToTensor:
    """Turns an HxW or HxWxC image into a float CxHxW tensor.

    uint8 input is scaled from 0..255 to [0, 1]; float input is kept as it is (assumed already
    scaled). Anything that is not a 2-D or 3-D numpy array or tensor raises ``TypeError``.
    """

    def __call__(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Converts one image.

        Args:
            image: a uint8 or float numpy array or tensor, HxW or HxWxC.

        Returns:
            A contiguous float32 tensor of shape CxHxW.
        """
        if not isinstance(image, (np.ndarray, torch.Tensor)):
            raise TypeError(
                f"ToTensor expects a numpy array or a torch tensor (HxW or HxWxC), "
                f"got {type(image).__name__}"
            )
        if image.ndim not in (2, 3):
            raise TypeError(
                f"ToTensor expects a 2-D (HxW) or 3-D (HxWxC) image, got shape {tuple(image.shape)}"
            )
        return _as_float_hwc(image).permute(2, 0, 1).contiguous()

    def __repr__(self) -> str:
        return "ToTensor()"


def _per_channel(values: float | Sequence[float], name: str) -> torch.Tensor:
    """Returns ``values`` as a float tensor of shape (C, 1, 1), ready to broadcast over CxHxW."""
    tensor = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
    if tensor.numel() == 0:
        raise ValueError(f"Normalize: {name} must not be empty")
    return tensor.reshape(-1, 1, 1)


class Normalize:
    """Normalises a CxHxW float tensor per channel: ``(x - mean[c]) / std[c]``.

    Args:
        mean: one value per channel, or a single value for all channels.
        std: one value per channel, or a single value for all channels; none may be zero.
        inplace: modify the input tensor instead of returning a new one.
    """

    def __init__(
        self, mean: float | Sequence[float], std: float | Sequence[float], inplace: bool = False
    ) -> None:
        self.mean = _per_channel(mean, "mean")
        self.std = _per_channel(std, "std")
        if bool((self.std == 0).any()):
            raise ValueError(
                f"Normalize: std must not contain zeros, got {self.std.flatten().tolist()}"
            )
        self.inplace = inplace

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        """Normalises one image.

        Args:
            tensor: a float tensor of shape CxHxW.

        Returns:
            The normalised tensor (the input itself when ``inplace``).
        """
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 3:
            shape = (
                tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            )
            raise TypeError(f"Normalize expects a CxHxW tensor (apply ToTensor first), got {shape}")
        channels = tensor.shape[0]
        for name, stat in (("mean", self.mean), ("std", self.std)):
            if stat.shape[0] not in (1, channels):
                raise ValueError(
                    f"Normalize: {name} has {stat.shape[0]} values for a {channels}-channel image"
                )
        mean = self.mean.to(tensor.device, tensor.dtype)
        std = self.std.to(tensor.device, tensor.dtype)
        if self.inplace:
            return tensor.sub_(mean).div_(std)
        return (tensor - mean) / std

    def __repr__(self) -> str:
        mean, std = self.mean.flatten().tolist(), self.std.flatten().tolist()
        return f"Normalize(mean={mean}, std={std})"


class Compose:
    """Applies transforms one after another.

    Args:
        transforms: callables, applied in the given order.
    """

    def __init__(self, transforms: Iterable[Callable[[Any], Any]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, value: Any) -> Any:
        """Returns ``value`` passed through every transform."""
        for transform in self.transforms:
            value = transform(value)
        return value

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}])"
