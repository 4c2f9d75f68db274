from __future__ import annotations

import gzip
import hashlib
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from ddprun.contrib.datasets import MNIST
from ddprun.contrib.datasets import mnist as mnist_module
from ddprun.contrib.datasets.mnist import DatasetNotFoundError, IDXFormatError, read_idx
from ddprun.data.transforms import ToTensor

RAW = Path("MNIST") / "raw"


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, synthetic, gz):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = synthetic.write_idx(tmp_path / "x-idx3-ubyte", array, gz=gz)
    assert path.name.endswith(".gz") == gz
    back = read_idx(path, ndims=3)
    assert back.dtype == np.uint8 and np.array_equal(back, array)
    assert back.flags.writeable


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_reads_synthetic_files(tmp_path, synthetic, gz):
    root = synthetic.make_synthetic_mnist(tmp_path, n_train=50, n_test=20, gz=gz)
    train, test = MNIST(root), MNIST(root, train=False, transform=ToTensor())
    assert (len(train), len(test)) == (50, 20)
    image, label = train[0]  # no transform: Catalyst 21.12's normalised float tensor
    assert isinstance(image, torch.Tensor) and image.shape == (1, 28, 28)
    expected = (train.images[0].astype(np.float32) / 255 - 0.1307) / 0.3081
    assert torch.allclose(image[0], torch.from_numpy(expected), atol=1e-6)
    assert isinstance(label, int) and 0 <= label < 10
    tensor, _ = test[3]
    assert tensor.shape == (1, 28, 28) and tensor.dtype == torch.float32
    assert 0.0 <= tensor.min() and tensor.max() <= 1.0


def test_plain_file_wins_over_gz_and_target_transform(tmp_path, synthetic):
    root = synthetic.make_synthetic_mnist(tmp_path, n_train=10, n_test=5, gz=True)
    synthetic.write_idx(root / RAW / "t10k-labels-idx1-ubyte", np.full(5, 7, np.uint8))
    test = MNIST(root, train=False, target_transform=lambda y: y + 100)
    assert [test[i][1] for i in range(5)] == [107] * 5


def test_item_is_a_copy(tmp_path, synthetic):
    root = synthetic.make_synthetic_mnist(tmp_path, n_train=4, n_test=4)
    data = MNIST(root)
    data[0][0][:] = 0
    assert data.images[0].any()


def _write_raw(path: Path, payload: bytes, gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


def test_bad_magic_names_the_file(tmp_path):
    path = _write_raw(
        tmp_path / "bad-idx1-ubyte", b"\x00\x00\x0d\x01" + b"\x00\x00\x00\x01" + b"\x05"
    )
    with pytest.raises(IDXFormatError, match=r"bad-idx1-ubyte.*bad magic"):
        read_idx(path)


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_file_names_the_file(tmp_path, synthetic, gz):
    full = synthetic.write_idx(tmp_path / "full", np.zeros((3, 2, 2), np.uint8))
    path = _write_raw(tmp_path / "cut-idx3-ubyte", full.read_bytes()[:-3], gz=gz)
    with pytest.raises(IDXFormatError, match=r"cut-idx3-ubyte.*truncated"):
        read_idx(path)


def test_cut_gzip_stream_names_the_file(tmp_path, synthetic):
    full = synthetic.write_idx(tmp_path / "full", np.zeros((50, 9, 9), np.uint8), gz=True)
    path = _write_raw(tmp_path / "cut.gz", full.read_bytes()[:20])
    with pytest.raises(IDXFormatError, match=r"cut\.gz.*corrupt"):
        read_idx(path)


def test_truncated_header_and_wrong_ndims(tmp_path, synthetic):
    with pytest.raises(IDXFormatError, match="short-idx.*truncated"):
        read_idx(_write_raw(tmp_path / "short-idx", b"\x00\x00\x08\x03\x00\x00"))
    labels = synthetic.write_idx(tmp_path / "labels", np.zeros(4, np.uint8))
    with pytest.raises(IDXFormatError, match="labels.*1 dimensions, expected 3"):
        read_idx(labels, ndims=3)


def test_count_mismatch_names_both_files(tmp_path, synthetic):
    root = synthetic.make_synthetic_mnist(tmp_path, n_train=10, n_test=5)
    synthetic.write_idx(root / RAW / "train-labels-idx1-ubyte", np.zeros(9, np.uint8))
    with pytest.raises(
        IDXFormatError, match=r"train-images-idx3-ubyte.*10 images.*train-labels.*9"
    ):
        MNIST(root)


def test_missing_files_without_download(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        MNIST(tmp_path, train=False, download=False)
    message = str(info.value)
    assert str(tmp_path / RAW / "t10k-images-idx3-ubyte") in message
    assert "t10k-labels-idx1-ubyte" in message and "download=True" in message
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, FileNotFoundError)


def test_download_without_network_says_what_to_do(tmp_path, monkeypatch):
    calls = []

    def offline(url: str, timeout: float = 0.0) -> bytes:
        calls.append(url)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(mnist_module, "_fetch", offline)
    with pytest.raises(RuntimeError, match="download failed") as info:
        MNIST(tmp_path, train=True, download=True)
    message = str(info.value)
    assert "train-images-idx3-ubyte.gz" in message and "train-labels-idx1-ubyte.gz" in message
    assert str(tmp_path / RAW) in message and "by hand" in message
    # every mirror was tried for both missing files, nothing left behind
    assert len(calls) == 2 * len(mnist_module.MIRRORS)
    assert not any(p.is_file() for p in (tmp_path / RAW).iterdir())


def test_present_files_are_never_downloaded(tmp_path, synthetic, monkeypatch):
    root = synthetic.make_synthetic_mnist(tmp_path, n_train=10, n_test=5)

    def must_not_fetch(url: str, timeout: float = 0.0) -> bytes:
        raise AssertionError(f"unexpected download of {url}")

    monkeypatch.setattr(mnist_module, "_fetch", must_not_fetch)
    assert len(MNIST(root, download=True)) == 10


def test_download_checks_md5_and_uses_next_mirror(tmp_path, synthetic, monkeypatch):
    # Serve valid gz payloads; pretend their published checksums are these payloads' MD5.
    source = synthetic.make_synthetic_mnist(tmp_path / "src", n_train=6, n_test=3, gz=True)
    payloads = {p.name: p.read_bytes() for p in (source / RAW).iterdir()}
    md5 = {name: hashlib.md5(data).hexdigest() for name, data in payloads.items()}
    monkeypatch.setattr(mnist_module, "MD5", md5)
    calls = []

    def flaky(url: str, timeout: float = 0.0) -> bytes:
        calls.append(url)
        name = url.rsplit("/", 1)[1]
        # the first mirror serves corrupt bytes, the second the real file
        return b"garbage" if url.startswith(mnist_module.MIRRORS[0]) else payloads[name]

    monkeypatch.setattr(mnist_module, "_fetch", flaky)
    data = MNIST(tmp_path / "dst", train=False, download=True)
    assert len(data) == 3 and len(calls) == 4
    assert sorted(p.name for p in (tmp_path / "dst" / RAW).iterdir()) == [
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ]


def test_download_corrupt_everywhere_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(mnist_module, "_fetch", lambda url, timeout=0.0: b"garbage")
    with pytest.raises(RuntimeError, match="MD5"):
        MNIST(tmp_path, train=False, download=True)
