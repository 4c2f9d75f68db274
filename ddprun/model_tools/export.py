"""Tracing and ONNX export of a model's method (``ddprun.utils.trace_model``, ``onnx_export``).

``onnx`` is imported only by `onnx_export` (the ``ddprun[onnx]`` extra).
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ddprun._optional import import_optional
from ddprun.checkpoint import unwrap_module

__all__ = ["onnx_export", "trace_model"]


class _MethodAsForward(nn.Module):
    """Calls ``model.<method_name>`` as its forward, so tracers see that method."""

    def __init__(self, model: nn.Module, method_name: str) -> None:
        super().__init__()
        if not callable(getattr(model, method_name, None)):
            raise AttributeError(f"{type(model).__name__} has no method {method_name!r}")
        self.model = model
        self.method_name = method_name

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.model, self.method_name)(*args, **kwargs)


def _entry_module(model: nn.Module, method_name: str) -> nn.Module:
    module = unwrap_module(model)
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(module).__name__}")
    return module if method_name == "forward" else _MethodAsForward(module, method_name)


def _on_device_of(module: nn.Module, batch: Any) -> Any:
    from ddprun.utils import any2device

    tensor = next(iter(module.parameters()), None)
    if tensor is None:
        tensor = next(iter(module.buffers()), None)
    return batch if tensor is None else any2device(batch, tensor.device)


def _as_inputs(batch: Any) -> tuple[tuple[Any, ...], dict[str, Any] | None]:
    """``(positional inputs, keyword inputs or None)`` of a tensor, a sequence or a dict."""
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (list, tuple)):
        return tuple(batch), None
    return (batch,), None


def trace_model(
    model: nn.Module,
    batch: torch.Tensor | tuple[torch.Tensor, ...] | Mapping[str, torch.Tensor],
    method_name: str = "forward",
) -> torch.jit.ScriptModule:
    """A TorchScript module traced from ``model.<method_name>`` on `batch`.

    Args:
        model: the model (DP/DDP/compiled wrappers are removed).
        batch: the example input: a tensor, a tuple of positional inputs, or a dict of
            keyword inputs; it is moved to the model's device.
        method_name: the method traced as the module's ``forward``.

    The model's train/eval mode is traced as it is (call ``model.eval()`` first for
    inference: dropout and batch norm are recorded in their current mode).
    """
    module = _entry_module(model, method_name)
    args, kwargs = _as_inputs(_on_device_of(module, batch))
    if kwargs is not None:
        return torch.jit.trace(module, example_kwarg_inputs=kwargs)
    return torch.jit.trace(module, example_inputs=args)


def onnx_export(
    model: nn.Module,
    batch: torch.Tensor | tuple[torch.Tensor, ...],
    file: str | os.PathLike[str],
    method_name: str = "forward",
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: Mapping[str, Any] | None = None,
    opset_version: int = 9,
    do_constant_folding: bool = False,
    return_model: bool = False,
    verbose: bool = False,
) -> Any:
    """Export ``model.<method_name>`` to an ONNX file (needs ``pip install "ddprun[onnx]"``).

    Uses torch's TorchScript-based exporter, which honours Catalyst's defaults (opset 9,
    ``dynamic_axes``); torch's newer exporter needs onnxscript and opset 18 or later. The
    model is exported in eval mode and the batch is moved to its device; missing parent
    folders of `file` are created.

    Args:
        model: the model (DP/DDP/compiled wrappers are removed).
        batch: example input: a tensor or a tuple of positional inputs.
        file: the ``.onnx`` file to write.
        method_name: the method exported as the graph.
        input_names, output_names, dynamic_axes, opset_version, do_constant_folding, verbose:
            as in ``torch.onnx.export``.
        return_model: also load and return the written ``onnx.ModelProto`` (else None).

    Raises:
        ImportError: naming the ``onnx`` extra when onnx is not installed.
    """
    onnx = import_optional("onnx", "onnx", "onnx_export")
    module = _entry_module(model, method_name)
    args, kwargs = _as_inputs(_on_device_of(module, batch))
    if kwargs is not None:
        raise TypeError("onnx_export takes a tensor or a tuple of tensors as batch, not a dict")
    path = Path(file)
    path.parent.mkdir(parents=True, exist_ok=True)
    options: dict[str, Any] = {
        "verbose": verbose,
        "input_names": list(input_names) if input_names is not None else None,
        "output_names": list(output_names) if output_names is not None else None,
        "dynamic_axes": dict(dynamic_axes) if dynamic_axes is not None else None,
        "opset_version": opset_version,
        "do_constant_folding": do_constant_folding,
    }
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        options["dynamo"] = False
    with warnings.catch_warnings():
        # the exporter is chosen here, not by the user: its deprecation notice is noise
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
        torch.onnx.export(module, args, str(path), **options)
    return onnx.load(str(path)) if return_model else None
