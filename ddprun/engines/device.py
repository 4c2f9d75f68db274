"""Single-process engines: DeviceEngine, AMPEngine and DataParallelEngine."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ddprun.engines.engine import IEngine
from ddprun.engines.precision import MixedPrecision


class DeviceEngine(IEngine):
    """One process on one device: "cpu", "cuda", "cuda:1" (default CUDA when available)."""

    def __init__(self, device: str | torch.device | None = None) -> None:
        super().__init__(device)


class AMPEngine(IEngine):
    """One device with autocast: fp16 + GradScaler on CUDA, bf16 on CPU (by default).

    Args:
        device: as for DeviceEngine.
        dtype: torch.float16 or torch.bfloat16 (or "fp16"/"bf16"); default per device.
        scaler_kwargs: passed to the GradScaler (fp16 only).
    """

    def __init__(
        self,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        scaler_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(device)
        self.precision = MixedPrecision(self.device.type, parse_dtype(dtype), scaler_kwargs)


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """Accept torch dtypes and the short names "fp16"/"float16"/"bf16"/"bfloat16"."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "fp16": torch.float16,
        "float16": torch.float16,
        "half": torch.float16,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
    }
    if dtype not in names:
        raise ValueError(f"unknown AMP dtype {dtype!r}; expected one of {sorted(names)}")
    return names[dtype]


class DataParallelEngine(IEngine):
    """``nn.DataParallel`` over the visible GPUs: a thin convenience for one process."""

    def __init__(self) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("DataParallelEngine needs CUDA; use DeviceEngine('cpu') instead")
        super().__init__(f"cuda:{torch.cuda.current_device()}")

    def _wrap(self, module: nn.Module) -> nn.Module:
        """The plain module (`prepare_model` strips old wrappers) on the device, in DataParallel."""
        return nn.DataParallel(module.to(self.device))
