"""Catalyst 21.12's contrib data surface (issue 12, items 3 and 5): MNIST's item format and
arguments, the image transforms, the class-balancing samplers, the MNIST-derived metric-learning
datasets, and a real 2-rank metric-learning run (BatchBalanceClassSampler as the batch sampler)
replayed in one process. Layers, losses and in-batch samplers: test_contrib_nn.py."""

from __future__ import annotations

import json
import sys
import urllib.error
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ddprun import contrib
from ddprun.contrib import data as cdata
from ddprun.contrib import datasets, models
from ddprun.contrib import nn as cnn
from ddprun.contrib.datasets import mnist as mnist_module
from ddprun.data import BalanceClassSampler, BatchBalanceClassSampler, ToTensor
from tests.synthetic_mnist import make_synthetic_mnist
from tests.workloads.helpers import run

SCRIPTS = Path(__file__).parent / "scripts"
MEAN, STD = 0.1307, 0.3081
pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_synthetic_mnist(tmp_path_factory.mktemp("mnist"), n_train=240, n_test=80)


@pytest.fixture
def offline(monkeypatch) -> list[str]:
    """Every download attempt fails as without network, and is recorded."""
    calls: list[str] = []

    def fetch(url: str, timeout: float = 0.0) -> bytes:
        calls.append(url)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(mnist_module, "_fetch", fetch)
    return calls


def _expected(raw: np.ndarray, mean: float = MEAN, std: float = STD) -> torch.Tensor:
    return torch.from_numpy((raw.astype(np.float64) / 255 - mean) / std).float()


# ------------------------------------------------------------------------------------ MNIST
def test_mnist_without_transform_is_catalysts_normalised_tensor(root, offline):
    assert contrib.MNIST is datasets.MNIST and mnist_module.MNIST_NORMALIZE == (MEAN, STD)
    train = contrib.MNIST(root)  # download=True by default: files present, nothing fetched
    assert offline == [] and len(train) == 240
    image, label = train[5]
    assert image.dtype == torch.float32 and image.shape == (1, 28, 28)
    assert torch.allclose(image[0], _expected(train.images[5]), atol=1e-6)
    assert isinstance(label, int) and label == int(train.targets[5])
    # every pixel of the split: the constants are for [0, 1] pixels, not 0..255 ones
    stacked = torch.stack([train[i][0] for i in range(len(train))])
    assert float(stacked.min()) == pytest.approx(-MEAN / STD, abs=1e-6)
    assert float(stacked.max()) <= (1 - MEAN) / STD + 1e-6
    images, labels = next(iter(DataLoader(train, batch_size=8)))
    assert images.shape == (8, 1, 28, 28) and labels.dtype == torch.int64


def test_mnist_normalize_and_numpy_arguments(root):
    raw = contrib.MNIST(root, train=False, normalize=None)
    assert len(raw) == 80 and torch.allclose(raw[3][0][0], _expected(raw.images[3], 0, 1))
    custom = contrib.MNIST(root, train=False, normalize=(0.5, 0.25))
    assert torch.allclose(custom[3][0][0], _expected(raw.images[3], 0.5, 0.25), atol=1e-6)
    array, label = contrib.MNIST(root, train=False, numpy=True)[3]
    assert isinstance(array, np.ndarray) and array.shape == (28, 28) and array.dtype == np.float32
    assert np.allclose(array, _expected(raw.images[3]).numpy(), atol=1e-6) and label == raw[3][1]
    assert raw.data is raw.images and raw.class_to_idx["7 - seven"] == 7
    assert "Split: Test" in repr(raw) and "Number of datapoints: 80" in repr(raw)


def test_mnist_with_a_transform_is_unchanged(root):
    seen = []

    def record(image):
        seen.append((type(image), image.dtype, image.shape))
        return ToTensor()(image)

    data = contrib.MNIST(root, transform=record, target_transform=lambda y: y + 100)
    image, label = data[0]
    assert seen == [(np.ndarray, np.uint8, (28, 28))] and label == int(data.targets[0]) + 100
    assert torch.allclose(image[0], torch.from_numpy(data.images[0] / 255).float())
    # Catalyst's own pipeline gives the default item
    pipeline = cdata.Compose([cdata.ImageToTensor(), cdata.NormalizeImage((MEAN,), (STD,))])
    assert torch.allclose(contrib.MNIST(root, transform=pipeline)[7][0], contrib.MNIST(root)[7][0])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"numpy": True, "transform": ToTensor()}, ValueError, "numpy=True applies only"),
        ({"normalize": (0.5, 0.5), "transform": ToTensor()}, ValueError, "normalise inside"),
        ({"normalize": (1.0, 2.0, 3.0)}, ValueError, r"two numbers \(mean, std\)"),
        ({"normalize": (0.1, 0.0)}, ValueError, "std must be > 0"),
        ({"normalize": ToTensor()}, TypeError, "transform is passed by keyword"),
    ],
)
def test_mnist_bad_arguments_say_what_is_wrong(root, kwargs, error, match):
    with pytest.raises(error, match=match):
        contrib.MNIST(root, **kwargs)


def test_mnist_download_by_default_offline_keeps_the_clear_message(tmp_path, offline):
    with pytest.raises(RuntimeError, match="download failed") as info:
        contrib.MNIST(tmp_path / "empty", train=False)
    assert "by hand" in str(info.value) and len(offline) == 2 * len(mnist_module.MIRRORS)


def test_image_transforms_under_catalyst_names():
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)  # HxWxC
    tensor = cdata.ImageToTensor()(image)
    assert tensor.shape == (3, 2, 3) and tensor.dtype == torch.float32
    assert torch.equal(tensor, torch.from_numpy(image).permute(2, 0, 1).float() / 255)
    assert torch.equal(cdata.image_to_tensor(image), tensor)
    normed = cdata.NormalizeImage((0.1, 0.2, 0.3), (0.5, 0.5, 0.25))(tensor)
    expected = (tensor - torch.tensor([0.1, 0.2, 0.3])[:, None, None]) / torch.tensor(
        [0.5, 0.5, 0.25]
    )[:, None, None]
    assert torch.allclose(normed, expected)
    assert torch.allclose(cdata.normalize_image(tensor, (0.1, 0.2, 0.3), (0.5, 0.5, 0.25)), normed)
    assert repr(cdata.ImageToTensor()) == "ImageToTensor()"
    assert repr(cdata.NormalizeImage(0.5, 0.5)).startswith("NormalizeImage(")
    with pytest.raises(TypeError, match="numpy array or a torch tensor"):
        cdata.ImageToTensor()([[1, 2], [3, 4]])
    assert contrib.Compose is cdata.Compose and contrib.ImageToTensor is cdata.ImageToTensor


# ---------------------------------------------------------------------------------- samplers
def _labels() -> list[int]:
    # five classes of 10, 7, 5, 3 and 2 items, interleaved
    counts = {0: 10, 1: 7, 2: 5, 3: 3, 4: 2}
    return [c for i in range(10) for c, n in counts.items() if i < n]


def test_batch_balance_class_sampler_yields_p_classes_by_k_samples():
    labels = _labels()
    sampler = BatchBalanceClassSampler(labels, num_classes=3, num_samples=3, num_batches=50)
    assert (len(sampler), sampler.batch_size, sampler.batches_in_epoch) == (50, 9, 50)
    sampler.generator = torch.Generator().manual_seed(0)
    batches = list(sampler)
    assert len(batches) == 50
    classes_seen = Counter()
    for batch in batches:
        assert len(batch) == 9
        blocks = [batch[i : i + 3] for i in range(0, 9, 3)]  # the k items of each class
        block_labels = [{labels[i] for i in block} for block in blocks]
        assert all(len(s) == 1 for s in block_labels)  # each block one class
        chosen = [s.pop() for s in block_labels]
        assert len(set(chosen)) == 3  # p distinct classes
        for cls, block in zip(chosen, blocks):
            # without replacement where the class has >= k items; class 4 (2 items) repeats
            assert len(set(block)) == 3 if cls != 4 else len(set(block)) <= 2
        classes_seen.update(chosen)
    assert set(classes_seen) == {0, 1, 2, 3, 4}  # classes picked uniformly: all appear
    sampler.generator = torch.Generator().manual_seed(0)
    assert list(sampler) == batches  # its generator decides the epoch
    sampler.generator = torch.Generator().manual_seed(1)
    assert list(sampler) != batches
    default = BatchBalanceClassSampler(torch.tensor(labels), num_classes=2, num_samples=2)
    assert len(default) == len(labels) // 4
    loader = DataLoader(torch.arange(len(labels)), batch_sampler=default)
    assert [len(b) for b in loader] == [4] * len(default)


@pytest.mark.parametrize(
    ("labels", "kwargs", "match"),
    [
        ([0, 0, 1, 1], {"num_classes": 1, "num_samples": 2}, "num_classes must be an int >= 2"),
        ([0, 0, 1, 1], {"num_classes": 2, "num_samples": 1}, "num_samples must be an int >= 2"),
        ([0, 0, 1, 1], {"num_classes": 3, "num_samples": 2}, "only 2 classes"),
        ([0, 0, 1, 1, 2], {"num_classes": 2, "num_samples": 2}, r"these have 1: \{2: 1\}"),
        ([0, 0, 1, 1], {"num_classes": 2, "num_samples": 4}, "no full batch of 2 x 4"),
        ([0, 0, 1, 1], {"num_classes": 2, "num_samples": 2, "num_batches": 0}, "num_batches"),
        ([0.5, 0.5, 1.0, 1.0], {"num_classes": 2, "num_samples": 2}, "class ids"),
    ],
)
def test_batch_balance_class_sampler_refuses_bad_arguments(labels, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        BatchBalanceClassSampler(labels, **kwargs)


@pytest.mark.parametrize(("mode", "per_class"), [("downsampling", 2), ("upsampling", 10), (4, 4)])
def test_balance_class_sampler_draws_every_class_equally(mode, per_class):
    labels = _labels()
    sampler = BalanceClassSampler(labels, mode=mode, generator=torch.Generator().manual_seed(3))
    indices = list(sampler)
    assert len(sampler) == len(indices) == 5 * per_class
    assert Counter(labels[i] for i in indices) == {c: per_class for c in range(5)}
    assert indices != sorted(indices)  # shuffled
    with pytest.raises(ValueError, match="'downsampling', 'upsampling' or an int"):
        BalanceClassSampler(labels, mode="balanced")


# ---------------------------------------------------------------------- MNIST-derived datasets
def test_mnist_ml_dataset_is_the_train_split_digits_0_to_4(root):
    full = contrib.MNIST(root)
    ml = datasets.MnistMLDataset(root=root)
    keep = np.flatnonzero(full.targets < 5)
    assert len(ml) == len(keep) and ml.get_labels() == full.targets[keep].tolist()
    assert isinstance(ml, cdata.MetricLearningTrainDataset) and len(ml.classes) == 5
    image, label = ml[3]
    assert torch.equal(image, full[int(keep[3])][0]) and label == int(full.targets[keep[3]])
    with pytest.raises(ValueError, match="training split"):
        datasets.MnistMLDataset(root=root, train=False)
    assert mnist_module.MnistMLDataset is datasets.MnistMLDataset  # Catalyst's module path


def test_mnist_qg_dataset_is_the_test_split_digits_5_to_9_queries_first(root):
    test = contrib.MNIST(root, train=False)
    keep = np.flatnonzero(test.targets >= 5)
    qg = datasets.MnistQGDataset(root=root, gallery_fraq=0.3)
    assert len(qg) == len(keep) and qg.targets.tolist() == test.targets[keep].tolist()
    assert qg.gallery_size == int(0.3 * len(keep)) and qg.query_size == len(keep) - qg.gallery_size
    flags = [bool(qg[i]["is_query"]) for i in range(len(qg))]
    assert flags == [True] * qg.query_size + [False] * qg.gallery_size
    item = qg[2]
    assert set(item) == {"features", "targets", "is_query"}
    assert torch.equal(item["features"], test[int(keep[2])][0]) and item["targets"] >= 5
    batch = next(iter(DataLoader(qg, batch_size=4)))
    assert batch["features"].shape == (4, 1, 28, 28) and batch["is_query"].dtype == torch.bool
    assert isinstance(qg, cdata.QueryGalleryDataset)
    with pytest.raises(ValueError, match="always MNIST's test split"):
        datasets.MnistQGDataset(root=root, train=True)
    with pytest.raises(ValueError, match=r"gallery_fraq must be in \[0, 1\]"):
        datasets.MnistQGDataset(root=root, gallery_fraq=1.5)
    with pytest.raises(TypeError, match="root="):
        datasets.MnistQGDataset(str(root))


def test_partial_mnist_keeps_the_first_items_of_each_digit(root):
    full = contrib.MNIST(root)
    part = datasets.PartialMNIST(num_samples=5, classes=(2, 0), root=root)
    expected = np.sort(np.concatenate([np.flatnonzero(full.targets == c)[:5] for c in (0, 2)]))
    assert part.classes == [0, 2] and part.targets.tolist() == full.targets[expected].tolist()
    assert np.array_equal(part.images, full.images[expected])


# ------------------------------------------------------------------------- real 2-rank run
def test_metric_learning_on_two_ranks_equals_one_process_replay(root, tmp_path):
    """ddprun --nproc 2: BatchBalanceClassSampler is dealt whole (rank r: batches r, r+2, ...
    of one draw), every batch is 3 classes x 4, and weights, losses and valid embeddings equal
    one process running the same batches (the 2 ranks' losses averaged per step)."""
    argv = [sys.executable, "-m", "ddprun", "--nproc", "2"]
    argv += [str(SCRIPTS / "contrib_metric_learning.py"), "--root", str(root)]
    done = run([*argv, "--out", str(tmp_path)], cwd=tmp_path, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["batch_sampler"] == "DistributedBatchSamplerWrapper"

    train = datasets.MnistMLDataset(root=root)
    labels = train.get_labels()
    sampler = BatchBalanceClassSampler(labels, num_classes=3, num_samples=4, num_batches=6)
    for epoch in ("1", "2"):
        sampler.generator = torch.Generator().manual_seed(7 + int(epoch))  # run seed + epoch
        drawn = list(sampler)
        for r in (0, 1):
            assert ranks[r]["batches"][epoch] == drawn[r::2]
            for batch in ranks[r]["batches"][epoch]:
                counts = Counter(labels[i] for i in batch)
                assert len(counts) == 3 and set(counts.values()) == {4}
    assert ranks[0]["batches"]["1"] != ranks[0]["batches"]["2"]

    torch.manual_seed(0)
    model = models.MnistSimpleNet(out_features=8)
    criterion = cnn.TripletMarginLossWithSampler(0.5, cdata.HardTripletsSampler())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for epoch in ("1", "2"):
        for step, pair in enumerate(zip(*(r["batches"][epoch] for r in ranks))):
            losses = []
            for batch in pair:
                images = torch.stack([train[i][0] for i in batch])
                losses.append(criterion(model(images), torch.tensor([labels[i] for i in batch])))
            for r in (0, 1):
                assert ranks[r]["losses"][epoch][step] == pytest.approx(losses[r].item(), abs=1e-5)
            (sum(losses) / 2).backward()
            optimizer.step()
            optimizer.zero_grad()
    trained = torch.load(tmp_path / "weights.pt")
    for name, value in model.state_dict().items():
        assert torch.allclose(trained[name], value, atol=1e-5), name

    valid = datasets.MnistQGDataset(root=root, gallery_fraq=0.5)
    with torch.no_grad():
        expected = model(torch.stack([valid[i]["features"] for i in range(len(valid))]))
    gathered = sum((r["valid"]["2"]["embeddings"] for r in ranks), [])  # contiguous blocks
    assert torch.allclose(torch.tensor(gathered), expected, atol=1e-5)
    flags = sum((r["valid"]["2"]["is_query"] for r in ranks), [])
    assert flags == [bool(valid[i]["is_query"]) for i in range(len(valid))]
