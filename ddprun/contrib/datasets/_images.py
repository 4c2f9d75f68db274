"""InMemoryImages: the item access MNIST and Digits share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from torch.utils.data import Dataset


class InMemoryImages(Dataset):
    """Uint8 images and int labels held in numpy arrays; subclasses fill `images`/`targets`.

    Items are ``(transform(image), target_transform(label))``; the image is a copy, so a
    transform that writes into it cannot change the dataset. Without a transform the image goes
    through ``_default_image`` (the uint8 array itself here; MNIST makes it a tensor).
    """

    images: np.ndarray
    targets: np.ndarray
    transform: Callable[[Any], Any] | None = None
    target_transform: Callable[[Any], Any] | None = None

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image: Any = self.images[index].copy()
        label: Any = int(self.targets[index])
        if self.transform is not None:
            image = self.transform(image)
        else:
            image = self._default_image(image)
        if self.target_transform is not None:
            label = self.target_transform(label)
        return image, label

    def _default_image(self, image: np.ndarray) -> Any:
        """Returns an item's image when no transform is given."""
        return image
