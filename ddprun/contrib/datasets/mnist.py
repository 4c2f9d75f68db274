"""MNIST from the standard IDX files, with an optional checksum-verified download.

Layout (the one torchvision and Catalyst use)::

    <root>/MNIST/raw/train-images-idx3-ubyte[.gz]   train-labels-idx1-ubyte[.gz]
    <root>/MNIST/raw/t10k-images-idx3-ubyte[.gz]    t10k-labels-idx1-ubyte[.gz]

A plain file wins over its ``.gz`` twin. Downloads fetch the ``.gz`` files and keep them as they
are: they are read directly, so nothing is extracted.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddprun.atomic import atomic_write_bytes
from ddprun.contrib.datasets._images import InMemoryImages

__all__ = [
    "MNIST",
    "MNIST_NORMALIZE",
    "DatasetNotFoundError",
    "IDXFormatError",
    "read_idx",
]

MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
# MD5 of the published .gz files.
MD5: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
SPLITS: dict[bool, tuple[str, str]] = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_UINT8_CODE = 0x08
_GZIP_MAGIC = b"\x1f\x8b"
_TIMEOUT_S = 30.0


class IDXFormatError(ValueError):
    """An IDX file is malformed (bad magic, truncated, or inconsistent with its partner)."""


class DatasetNotFoundError(FileNotFoundError, RuntimeError):
    """Dataset files are missing (a ``RuntimeError`` too, as in Catalyst)."""


def _open_bytes(path: Path) -> bytes:
    """Returns the file's content, decompressed when it is gzip (by its magic, not its name)."""
    data = path.read_bytes()
    if not data.startswith(_GZIP_MAGIC):
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError) as error:  # BadGzipFile is an OSError; a cut .gz is an EOFError
        raise IDXFormatError(f"{path}: cannot decompress ({error}); the file is corrupt") from error


def read_idx(path: str | os.PathLike[str], ndims: int | None = None) -> np.ndarray:
    """Parses a uint8 IDX file (plain or gzip).

    The header is two zero bytes, a dtype code (0x08 = uint8), the number of dimensions, then one
    big-endian int32 per dimension; the raw data follows.

    Args:
        path: the file.
        ndims: the expected number of dimensions, checked when given.

    Returns:
        A uint8 array with the file's shape.
    """
    path = Path(path)
    data = _open_bytes(path)
    if len(data) < 4:
        raise IDXFormatError(f"{path}: truncated: {len(data)} bytes, no IDX header")
    zero, code, dims = data[0:2], data[2], data[3]
    if zero != b"\x00\x00" or code != _UINT8_CODE:
        raise IDXFormatError(
            f"{path}: bad magic number 0x{data[:4].hex()} (expected 0x0000{_UINT8_CODE:02x}NN, uint8)"
        )
    if ndims is not None and dims != ndims:
        raise IDXFormatError(f"{path}: has {dims} dimensions, expected {ndims}")
    header_len = 4 + 4 * dims
    if len(data) < header_len:
        raise IDXFormatError(f"{path}: truncated inside the header ({len(data)} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">i4", count=dims, offset=4))
    expected = int(np.prod(shape, dtype=np.int64))
    actual = len(data) - header_len
    if actual != expected:
        what = "truncated" if actual < expected else "has trailing bytes"
        raise IDXFormatError(
            f"{path}: {what}: header says shape {shape} ({expected} bytes), found {actual} bytes"
        )
    # frombuffer over immutable bytes is read-only; copy once so items are ordinary arrays.
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(shape).copy()


def _fetch(url: str, timeout: float = _TIMEOUT_S) -> bytes:
    """Downloads ``url``; the one network call in this module (tests replace it)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:  # fixed https mirrors only
        return response.read()


def _download_one(raw: Path, name: str) -> str | None:
    """Fetches ``<name>.gz`` from the first mirror that serves it intact.

    Returns:
        None on success, else a summary of every mirror's failure.
    """
    gz_name = f"{name}.gz"
    failures = []
    for mirror in MIRRORS:
        url = mirror + gz_name
        try:
            payload = _fetch(url)
        except (urllib.error.URLError, OSError, TimeoutError) as error:
            failures.append(f"{url}: {error}")
            continue
        digest = hashlib.md5(payload).hexdigest()  # a checksum, not security
        if digest != MD5[gz_name]:
            failures.append(f"{url}: MD5 {digest} != expected {MD5[gz_name]} (corrupt download)")
            continue
        atomic_write_bytes(raw / gz_name, payload)
        return None
    return "; ".join(failures)


MNIST_NORMALIZE: tuple[float, float] = (0.1307, 0.3081)  # mean, std of MNIST's [0, 1] pixels


def _check_normalize(normalize: Any) -> tuple[float, float] | None:
    """Returns ``normalize`` as ``(mean, std)`` floats, or None; says what is wrong otherwise."""
    if normalize is None:
        return None
    if callable(normalize):
        raise TypeError(
            f"normalize must be (mean, std) or None, got {normalize!r}; a transform is passed "
            "by keyword: MNIST(root, train, transform=...)"
        )
    try:
        mean, std = (float(value) for value in normalize)
    except (TypeError, ValueError):
        raise ValueError(f"normalize must be two numbers (mean, std), got {normalize!r}") from None
    if not std > 0:
        raise ValueError(f"normalize: std must be > 0, got {std}")
    return mean, std


def _check_no_default_options(normalize: Any, numpy: bool) -> None:
    """With a transform the image is the transform's business: refuse options that would be
    silently ignored."""
    if numpy:
        raise ValueError("numpy=True applies only without a transform; drop one of them")
    if normalize is not None and tuple(normalize) != MNIST_NORMALIZE:
        raise ValueError(
            f"normalize={normalize!r} applies only without a transform; with a transform, "
            "normalise inside it (e.g. Compose([ImageToTensor(), NormalizeImage(mean, std)]))"
        )


class MNIST(InMemoryImages):
    """The MNIST handwritten digits, read from IDX files into memory once.

    Items are ``(image, label)``, ``label`` an int passed through ``target_transform``. Without
    a ``transform`` (Catalyst 21.12's format), ``image`` is a float32 1x28x28 tensor: the pixels
    scaled to [0, 1], then ``(x - mean) / std`` with ``normalize = (mean, std)`` (MNIST's own
    statistics by default, so pixels come out with mean ~0 and std ~1; ``normalize=None`` keeps
    [0, 1]); ``numpy=True`` gives the same values as a 28x28 float32 numpy array. With a
    ``transform``, it gets the raw uint8 28x28 numpy array (``ToTensor()`` makes it a 1x28x28
    float tensor in [0, 1]) and ``normalize`` / ``numpy`` do not apply.

    Decision: Catalyst 21.12 normalises the 0..255 pixels with statistics of [0, 1] pixels
    (values up to ~827); ddprun scales first, which is what the constants are for.

    Args:
        root: folder holding ``MNIST/raw/`` (``~`` is expanded).
        train: the 60k training split, else the 10k test split.
        download: fetch the split's missing files (only those) from the mirrors, checking MD5;
            files already there are never fetched. Catalyst's default (True); without network
            a missing file raises ``RuntimeError`` saying where to put it.
        normalize: ``(mean, std)`` for the images when no transform is given, or None.
        numpy: return a 28x28 numpy array instead of a 1x28x28 tensor (no transform only).
        transform: applied to each uint8 image (keyword only).
        target_transform: applied to each label (keyword only).
    """

    classes: tuple[str, ...] = (
        "0 - zero", "1 - one", "2 - two", "3 - three", "4 - four",
        "5 - five", "6 - six", "7 - seven", "8 - eight", "9 - nine",
    )  # fmt: skip

    def __init__(
        self,
        root: str | os.PathLike[str],
        train: bool = True,
        download: bool = True,
        normalize: tuple[float, float] | None = MNIST_NORMALIZE,
        numpy: bool = False,
        *,
        transform: Callable[[np.ndarray], Any] | None = None,
        target_transform: Callable[[int], Any] | None = None,
    ) -> None:
        self.normalize = _check_normalize(normalize)
        if transform is not None:
            _check_no_default_options(normalize, numpy)
        self.root = Path(root).expanduser()
        self.train = train
        self.numpy = numpy
        self.transform = transform
        self.target_transform = target_transform
        if download:
            self._download_missing()
        images_path, labels_path = self._locate()
        self.images = read_idx(images_path, ndims=3)
        self.targets = read_idx(labels_path, ndims=1).astype(np.int64)
        if len(self.images) != len(self.targets):
            raise IDXFormatError(
                f"count mismatch: {images_path} holds {len(self.images)} images but "
                f"{labels_path} holds {len(self.targets)} labels"
            )

    def _default_image(self, image: np.ndarray) -> torch.Tensor | np.ndarray:
        """Returns the scaled, normalised image (1x28x28 tensor, or 28x28 array if ``numpy``)."""
        pixels = torch.from_numpy(image).to(torch.float32).div_(255.0)
        if self.normalize is not None:
            mean, std = self.normalize
            pixels.sub_(mean).div_(std)
        return pixels.numpy() if self.numpy else pixels.unsqueeze(0)

    @property
    def data(self) -> np.ndarray:
        """Returns the uint8 images, N x 28 x 28 (Catalyst's name; a numpy array here)."""
        return self.images

    @data.setter
    def data(self, images: np.ndarray) -> None:
        self.images = images

    @property
    def class_to_idx(self) -> dict[str, int]:
        """Returns ``{class name: label}``."""
        return {name: index for index, name in enumerate(self.classes)}

    def __repr__(self) -> str:
        split = "Train" if self.train else "Test"
        return (
            f"Dataset {type(self).__name__}\n    Number of datapoints: {len(self)}\n"
            f"    Root location: {self.root}\n    Split: {split}"
        )

    @property
    def raw_folder(self) -> Path:
        """Returns the folder the IDX files live in: ``<root>/MNIST/raw``."""
        return self.root / "MNIST" / "raw"

    def _find(self, name: str) -> Path | None:
        """Returns the plain file, else its ``.gz``, else None."""
        for candidate in (self.raw_folder / name, self.raw_folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
        return None

    def _missing(self) -> list[str]:
        return [name for name in SPLITS[self.train] if self._find(name) is None]

    def _locate(self) -> tuple[Path, Path]:
        missing = self._missing()
        if missing:
            expected = ", ".join(str(self.raw_folder / f"{n}[.gz]") for n in missing)
            raise DatasetNotFoundError(
                f"MNIST files not found: {expected}. Pass download=True, or place the files "
                f"(plain or .gz) in {self.raw_folder}."
            )
        images, labels = (self._find(name) for name in SPLITS[self.train])
        return images, labels  # type: ignore[return-value]

    def _download_missing(self) -> None:
        """Downloads the split's missing files; files already present are never fetched."""
        missing = self._missing()
        if not missing:
            return
        self.raw_folder.mkdir(parents=True, exist_ok=True)
        failures = {name: _download_one(self.raw_folder, name) for name in missing}
        failed = {name: why for name, why in failures.items() if why is not None}
        if failed:
            raise RuntimeError(self._download_error(failed))

    def _download_error(self, failed: dict[str, str]) -> str:
        files = ", ".join(f"{name}.gz" for name in failed)
        details = "\n".join(f"  {name}.gz: {why}" for name, why in failed.items())
        return (
            f"MNIST download failed (no network or no mirror reachable); missing: {files}, "
            f"expected in {self.raw_folder}.\n{details}\n"
            f"To install by hand, copy the files from any MNIST mirror ({', '.join(MIRRORS)}) "
            f"into {self.raw_folder} (keep the .gz or extract it), then run again."
        )


_DERIVED = ("MnistMLDataset", "MnistQGDataset", "PartialMNIST")


def __getattr__(name: str) -> Any:
    # Catalyst's module path for the derived datasets; they live in mnist_ml (which imports
    # this module), so they are looked up on first use
    if name in _DERIVED:
        from ddprun.contrib.datasets import mnist_ml

        return getattr(mnist_ml, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
