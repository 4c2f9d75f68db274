"""Numeric precision as a part an engine is composed with (AMP is a precision, not an engine tree).

`Precision` is plain fp32: its hooks pass straight through. `MixedPrecision` owns autocast and,
for fp16, the GradScaler whose state goes into checkpoints. `ShardedMixedPrecision` is FSDP's:
no autocast (FSDP casts the parameters), a ShardedGradScaler for fp16.

Several optimizers per iteration (a GAN, an encoder and a head with their own optimizers) follow
torch's recipe for GradScaler: one scaled backward, each optimizer unscaled (when clipping) and
stepped, then exactly one ``scaler.update()``. The update is deferred until it is needed (the
next scaled backward, a checkpoint of the scaler, or the training loader's end), so every
optimizer stepped in between shares one scale, whoever drives the steps (OptimizerCallback, one
OptimizerCallback per optimizer, or a user's own loop).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

#: The fp32 "autocast": one shared no-op context; callers on the hot path compare with it and
#: skip the ``with`` (two Python-level calls per batch each) when they get it.
NO_AUTOCAST = contextlib.nullcontext()


class Precision:
    """fp32: autocast is a no-op, backward and step are the plain torch calls."""

    name = "fp32"

    def autocast(self) -> contextlib.AbstractContextManager:
        """Context for the forward pass (fp32: one shared no-op context, entered twice per
        batch, so no generator is built per call)."""
        return NO_AUTOCAST

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate `loss`."""
        loss.backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Make gradients true-scale before clipping (no-op without a scaler)."""

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Apply the optimizer step."""
        optimizer.step()

    def finish_steps(self) -> None:
        """Apply what the optimizer steps so far still owe (the scaler's one update)."""

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
        # an optimizer stepped through the scaler since the last update(): update once, later
        self._update_pending = False

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def finish_steps(self) -> None:
        self._flush_update()

    def _flush_update(self) -> None:
        """Run the one ``scaler.update()`` owed by the steps of the last iteration."""
        if self._update_pending:
            self.scaler.update()
            self._update_pending = False
            self._unscaled.clear()

    def backward(self, loss: torch.Tensor) -> None:
        if self.scaler is None:
            loss.backward()
        else:
            self._flush_update()  # a new iteration: the previous one's steps are all done
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
        # no update() here: other optimizers of this iteration must step with the same scale
        self.scaler.step(optimizer)
        self._update_pending = True

    def state_dict(self) -> dict[str, Any]:
        if self.scaler is None:
            return {}
        self._flush_update()  # the saved scale is the one the next iteration uses
        return {"scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.scaler is not None and state and "scaler" in state:
            self._update_pending = False
            self._unscaled.clear()
            self.scaler.load_state_dict(state["scaler"])


class ShardedMixedPrecision(MixedPrecision):
    """FSDP's mixed precision: FSDP itself casts parameters to `dtype` per module (its
    ``MixedPrecisionPolicy``, set by the FSDP engine), so there is no autocast; fp16 adds torch's
    ShardedGradScaler, which agrees on inf/NaN gradients across ranks (each holds one shard)."""

    def __init__(self, device_type: str, dtype: torch.dtype, scaler_kwargs: dict | None) -> None:
        super().__init__(device_type, dtype, scaler_kwargs)
        if self.scaler is not None:
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            self.scaler = ShardedGradScaler(device_type, **(scaler_kwargs or {}))

    def autocast(self) -> contextlib.AbstractContextManager:
        return NO_AUTOCAST
