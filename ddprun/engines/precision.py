"""Numeric precision as a part an engine is composed with (AMP is a precision, not an engine tree).

`Precision` is plain fp32: its hooks pass straight through. `MixedPrecision` owns autocast and,
for fp16, the GradScaler whose state goes into checkpoints.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

_NO_AUTOCAST = contextlib.nullcontext()


class Precision:
    """fp32: autocast is a no-op, backward and step are the plain torch calls."""

    name = "fp32"

    def autocast(self) -> contextlib.AbstractContextManager:
        """Context for the forward pass (fp32: one shared no-op context, entered twice per
        batch, so no generator is built per call)."""
        return _NO_AUTOCAST

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate `loss`."""
        loss.backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Make gradients true-scale before clipping (no-op without a scaler)."""

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Apply the optimizer step."""
        optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint (the scaler's, when there is one)."""
        return {}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore `state_dict()`."""


class MixedPrecision(Precision):
    """Autocast to `dtype` on `device_type`; fp16 adds a GradScaler (loss scaling).

    Args:
        device_type: "cuda" or "cpu".
        dtype: torch.float16 or torch.bfloat16; default fp16 on CUDA, bf16 on CPU.
        scaler_kwargs: passed to ``torch.amp.GradScaler`` (fp16 only).
    """

    def __init__(
        self,
        device_type: str,
        dtype: torch.dtype | None = None,
        scaler_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.device_type = device_type
        self.dtype = dtype or (torch.float16 if device_type == "cuda" else torch.bfloat16)
        if self.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"AMP dtype must be float16 or bfloat16, got {self.dtype}")
        use_scaler = self.dtype == torch.float16
        self.scaler = (
            torch.amp.GradScaler(device_type, **(scaler_kwargs or {})) if use_scaler else None
        )
        self.name = "bf16" if self.dtype == torch.bfloat16 else "fp16"
        self._unscaled: set[int] = set()

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        if self.scaler is None:
            loss.backward()
        else:
            self.scaler.scale(loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        # GradScaler allows one unscale per step; remember which optimizers are done.
        if self.scaler is not None and id(optimizer) not in self._unscaled:
            self.scaler.unscale_(optimizer)
            self._unscaled.add(id(optimizer))

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()
        self._unscaled.discard(id(optimizer))

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.scaler is not None and state and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
