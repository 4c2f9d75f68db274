"""Losses under Catalyst 21.12's ``catalyst.contrib.losses`` names (the ones its README and docs
examples use)."""

from ddprun.contrib.losses.region import DiceLoss, IoULoss, TrevskyLoss
from ddprun.contrib.losses.triplet import TripletMarginLossWithSampler

__all__ = ["DiceLoss", "IoULoss", "TrevskyLoss", "TripletMarginLossWithSampler"]
