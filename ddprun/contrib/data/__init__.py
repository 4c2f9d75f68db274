"""Data pieces under Catalyst 21.12's ``catalyst.contrib.data`` names: image transforms,
in-batch triplet samplers and the metric-learning dataset interfaces.

Catalyst also re-exports these from ``catalyst.data``; ddprun keeps them here only, because
``ddprun.data`` belongs to the core, which never imports contrib. The class-balancing batch
samplers are core: ``ddprun.data.BatchBalanceClassSampler`` and ``BalanceClassSampler``.
"""

from ddprun.contrib.data.dataset_ml import MetricLearningTrainDataset, QueryGalleryDataset
from ddprun.contrib.data.sampler_inbatch import (
    AllTripletsSampler,
    HardClusterSampler,
    HardTripletsSampler,
    IInbatchTripletSampler,
    InBatchTripletsSampler,
)
from ddprun.contrib.data.transforms import (
    Compose,
    ImageToTensor,
    NormalizeImage,
    image_to_tensor,
    normalize_image,
)

__all__ = [
    "AllTripletsSampler",
    "Compose",
    "HardClusterSampler",
    "HardTripletsSampler",
    "IInbatchTripletSampler",
    "ImageToTensor",
    "InBatchTripletsSampler",
    "MetricLearningTrainDataset",
    "NormalizeImage",
    "QueryGalleryDataset",
    "image_to_tensor",
    "normalize_image",
]
