"""Extras outside the core, under Catalyst 21.12's ``catalyst.contrib`` names: datasets (MNIST
and its metric-learning splits, Digits), image transforms, in-batch triplet samplers, layers,
losses and models. ``from ddprun.contrib import MNIST, IoULoss, Flatten, ...`` works as with
Catalyst; so do the submodules ``data``, ``datasets``, ``layers``, ``losses``, ``models`` and
``nn``. The core (runner, engines, callbacks, ``ddprun.data``) never imports this package.

``Normalize`` here is the L2-normalisation layer (as in Catalyst); the image transform is
``NormalizeImage`` (or ``ddprun.data.Normalize``).
"""

from ddprun.contrib import data, datasets, layers, losses, models, nn
from ddprun.contrib.data import (
    AllTripletsSampler,
    Compose,
    HardClusterSampler,
    HardTripletsSampler,
    IInbatchTripletSampler,
    ImageToTensor,
    InBatchTripletsSampler,
    MetricLearningTrainDataset,
    NormalizeImage,
    QueryGalleryDataset,
    image_to_tensor,
    normalize_image,
)
from ddprun.contrib.datasets import MNIST, Digits, MnistMLDataset, MnistQGDataset, PartialMNIST
from ddprun.contrib.layers import (
    Flatten,
    GaussianNoise,
    GlobalAvgPool2d,
    GlobalConcatPool2d,
    GlobalMaxPool2d,
    Lambda,
    Normalize,
    ResidualBlock,
)
from ddprun.contrib.losses import DiceLoss, IoULoss, TrevskyLoss, TripletMarginLossWithSampler
from ddprun.contrib.models import MnistBatchNormNet, MnistSimpleNet

__all__ = [
    "MNIST",
    "AllTripletsSampler",
    "Compose",
    "DiceLoss",
    "Digits",
    "Flatten",
    "GaussianNoise",
    "GlobalAvgPool2d",
    "GlobalConcatPool2d",
    "GlobalMaxPool2d",
    "HardClusterSampler",
    "HardTripletsSampler",
    "IInbatchTripletSampler",
    "ImageToTensor",
    "InBatchTripletsSampler",
    "IoULoss",
    "Lambda",
    "MetricLearningTrainDataset",
    "MnistBatchNormNet",
    "MnistMLDataset",
    "MnistQGDataset",
    "MnistSimpleNet",
    "Normalize",
    "NormalizeImage",
    "PartialMNIST",
    "QueryGalleryDataset",
    "ResidualBlock",
    "TrevskyLoss",
    "TripletMarginLossWithSampler",
    "data",
    "datasets",
    "image_to_tensor",
    "layers",
    "losses",
    "models",
    "nn",
    "normalize_image",
]
