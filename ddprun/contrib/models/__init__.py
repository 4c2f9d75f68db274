"""Models under Catalyst 21.12's ``catalyst.contrib.models`` names (those its README uses)."""

from ddprun.contrib.models.mnist import MnistBatchNormNet, MnistSimpleNet

__all__ = ["MnistBatchNormNet", "MnistSimpleNet"]
