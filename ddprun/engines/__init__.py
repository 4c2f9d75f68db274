"""Engines: where the run computes (device, precision, processes). See `IEngine`."""

from ddprun.engines.ddp import DistributedDataParallelAMPEngine, DistributedDataParallelEngine
from ddprun.engines.device import AMPEngine, DataParallelEngine, DeviceEngine
from ddprun.engines.engine import IEngine
from ddprun.engines.fsdp import FSDPEngine, FullyShardedDataParallelEngine
from ddprun.engines.precision import MixedPrecision, Precision

__all__ = [
    "AMPEngine",
    "DataParallelEngine",
    "DeviceEngine",
    "DistributedDataParallelAMPEngine",
    "DistributedDataParallelEngine",
    "FSDPEngine",
    "FullyShardedDataParallelEngine",
    "IEngine",
    "MixedPrecision",
    "Precision",
]
