"""Model utilities with Catalyst 21.12's names and signatures (``ddprun.utils.<name>``):
checkpoint averaging, tracing, dynamic quantization, pruning and ONNX export.

Every function accepts a model wrapped in DataParallel, DistributedDataParallel or
``torch.compile`` and works on the plain module inside. ``onnx`` is imported only by
`onnx_export` (the ``ddprun[onnx]`` extra); nothing here is imported by ``import ddprun``.
"""

from __future__ import annotations

import copy
import functools
import glob
import inspect
import os
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from ddprun._optional import import_optional
from ddprun.checkpoint import CheckpointError, load_checkpoint, unwrap_module

__all__ = [
    "average_weights",
    "get_averaged_weights_by_path_mask",
    "get_pruning_fn",
    "onnx_export",
    "prune_model",
    "quantize_model",
    "remove_reparametrization",
    "trace_model",
]


# ------------------------------------------------------------------ averaging
def _average_tensors(key: str, tensors: list[torch.Tensor]) -> torch.Tensor:
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise CheckpointError(f"average_weights: {key!r} has different shapes {sorted(shapes)}")
    first = tensors[0]
    if first.dtype == torch.bool:  # a mask: majority vote
        votes = torch.stack([t.to(torch.float64) for t in tensors]).mean(0)
        return votes >= 0.5
    wide = torch.complex128 if first.is_complex() else torch.float64
    mean = torch.stack([t.to(wide) for t in tensors]).mean(0)
    if not (first.is_floating_point() or first.is_complex()):
        mean = mean.round()  # integer counters (num_batches_tracked) stay integers
    return mean.to(first.dtype)


def _average(key: str, values: list[Any], sources: Sequence[str]) -> Any:
    if all(isinstance(v, Mapping) for v in values):
        keys = list(values[0])
        for value, source in zip(values[1:], sources[1:]):
            if set(value) != set(keys):
                missing, extra = sorted(set(keys) - set(value)), sorted(set(value) - set(keys))
                where = f" under {key!r}" if key else ""
                raise CheckpointError(
                    f"average_weights: {source} does not have the keys of {sources[0]}{where} "
                    f"(missing {missing}, extra {extra})"
                )
        prefix = f"{key}." if key else ""
        return OrderedDict(
            (k, _average(f"{prefix}{k}", [v[k] for v in values], sources)) for k in keys
        )
    if all(isinstance(v, torch.Tensor) for v in values):
        return _average_tensors(key, list(values))
    if any(isinstance(v, (torch.Tensor, Mapping)) for v in values):
        kinds = sorted({type(v).__name__ for v in values})
        raise CheckpointError(f"average_weights: {key!r} holds different kinds of values {kinds}")
    return values[0]  # non-tensor extra state: kept from the first


def average_weights(state_dicts: Sequence[Mapping[str, Any]]) -> OrderedDict:
    """The element-wise mean of model state dicts (stochastic weight averaging of checkpoints).

    Floating-point tensors are averaged in float64 and returned in their own dtype; integer
    tensors (e.g. BatchNorm's ``num_batches_tracked``) are averaged and rounded, boolean ones
    by majority. A dict of state dicts (the state of a dict of models) is averaged key by key.

    Raises:
        ValueError: for an empty list.
        CheckpointError: when the state dicts have different keys or shapes.
    """
    if not state_dicts:
        raise ValueError("average_weights needs at least one state dict, got none")
    sources = [f"state dict {i}" for i in range(len(state_dicts))]
    return _average("", list(state_dicts), sources)


def _model_state(path: str) -> Mapping[str, Any]:
    checkpoint = load_checkpoint(path)
    if "model_state_dict" not in checkpoint:
        return checkpoint  # a bare state dict: torch.save(model.state_dict(), path)
    state = checkpoint["model_state_dict"]
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path} holds no model state (model_state_dict is {state!r})")
    return state


def _no_match_message(pattern: str, path_mask: str, logdir: Any) -> str:
    message = f"get_averaged_weights_by_path_mask: no file matches {pattern!r}"
    if logdir is None:
        folder, name = os.path.split(path_mask)
        nested = os.path.join(folder or ".", "checkpoints", name)
        if glob.glob(nested):
            message += (
                f"; a run's checkpoints are in <logdir>/checkpoints: pass "
                f"path_mask={nested!r}, or logdir={folder or '.'!r} with path_mask={name!r}"
            )
    return message


def get_averaged_weights_by_path_mask(
    path_mask: str, logdir: str | os.PathLike[str] | None = None
) -> OrderedDict:
    """The averaged model weights of every checkpoint matching a glob pattern.

    Args:
        path_mask: a glob pattern such as ``"logs/checkpoints/train.*.pth"``.
        logdir: a run folder: the pattern is then matched in ``<logdir>/checkpoints``.

    Each file is a ddprun checkpoint (its ``model_state_dict``, a dict of state dicts for a
    dict of models) or a bare state dict. Files are read in sorted order. A run folder holds
    ``best.pth`` and ``last.pth`` besides the per-epoch files, which are usually the same
    epochs again: pick the mask accordingly (``"train.*.pth"`` for the epochs only).

    Raises:
        FileNotFoundError: when nothing matches (with a hint when the files are one folder down).
        CheckpointError: when the checkpoints do not hold the same keys and shapes.
    """
    if logdir is None:
        pattern = os.fspath(path_mask)
    else:
        pattern = os.path.join(os.fspath(logdir), "checkpoints", path_mask)
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise FileNotFoundError(_no_match_message(pattern, path_mask, logdir))
    return _average("", [_model_state(path) for path in paths], paths)


# ------------------------------------------------------- tracing and export
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


# --------------------------------------------------------------- quantization
_QUANT_DTYPES = {"qint8": torch.qint8, "quint8": torch.quint8, "float16": torch.float16}


def quantize_model(
    model: nn.Module,
    qconfig_spec: Mapping[Any, Any] | set[type[nn.Module]] | None = None,
    dtype: str | torch.dtype | None = "qint8",
) -> nn.Module:
    """A dynamically quantized copy of `model`, on the CPU (the model itself is untouched).

    Args:
        model: the model (DP/DDP/compiled wrappers are removed).
        qconfig_spec: which submodules to quantize, as in
            ``torch.ao.quantization.quantize_dynamic`` (default: Linear and recurrent layers).
        dtype: weight type: ``"qint8"`` (default), ``"quint8"``, ``"float16"`` or the torch
            dtype.

    If the active quantized engine cannot run the model, qnnpack is tried (as Catalyst does);
    that changes ``torch.backends.quantized.engine`` for the process.
    """
    if dtype is None:
        dtype = "qint8"
    if isinstance(dtype, str):
        if dtype not in _QUANT_DTYPES:
            raise ValueError(f"quantize_model: dtype {dtype!r} is not one of {list(_QUANT_DTYPES)}")
        dtype = _QUANT_DTYPES[dtype]
    if dtype not in _QUANT_DTYPES.values():
        raise ValueError(f"quantize_model: dtype {dtype} is not one of {list(_QUANT_DTYPES)}")
    from torch.ao.quantization import quantize_dynamic

    module = copy.deepcopy(unwrap_module(model)).cpu()
    try:
        return quantize_dynamic(module, qconfig_spec=qconfig_spec, dtype=dtype)
    except RuntimeError:
        engines = torch.backends.quantized.supported_engines
        if "qnnpack" not in engines or torch.backends.quantized.engine == "qnnpack":
            raise
        torch.backends.quantized.engine = "qnnpack"
        return quantize_dynamic(module, qconfig_spec=qconfig_spec, dtype=dtype)


# -------------------------------------------------------------------- pruning
_PRUNING_FNS: dict[str, Callable[..., Any]] = {
    "l1_unstructured": prune.l1_unstructured,
    "random_unstructured": prune.random_unstructured,
    "ln_structured": prune.ln_structured,
    "random_structured": prune.random_structured,
}


def get_pruning_fn(
    pruning_fn: str | Callable[..., Any], dim: int | None = None, l_norm: int | None = None
) -> Callable[..., Any]:
    """A function ``fn(module, name, amount)`` from a name in ``torch.nn.utils.prune``
    (``"l1_unstructured"``, ``"random_unstructured"``, ``"ln_structured"`` with `dim` and
    `l_norm`, ``"random_structured"`` with `dim`) or a callable of that form (returned as is).
    """
    if callable(pruning_fn):
        return pruning_fn
    if pruning_fn not in _PRUNING_FNS:
        raise ValueError(f"pruning_fn {pruning_fn!r} is not one of {list(_PRUNING_FNS)}")
    if pruning_fn.endswith("_unstructured"):
        return _PRUNING_FNS[pruning_fn]
    if dim is None:
        raise ValueError(f"pruning_fn={pruning_fn!r} is structured: pass dim=")
    if pruning_fn == "ln_structured":
        if l_norm is None:
            raise ValueError("pruning_fn='ln_structured' needs l_norm= (the norm, e.g. 1 or 2)")
        return functools.partial(prune.ln_structured, n=l_norm, dim=dim)
    return functools.partial(prune.random_structured, dim=dim)


def _has_tensor(module: nn.Module, key: str) -> bool:
    # a parameter of this module itself (not of a child), or one pruned before
    own = module._parameters
    return own.get(key) is not None or own.get(f"{key}_orig") is not None


def _selected(model: nn.Module, layers: Sequence[str] | None) -> list[tuple[str, nn.Module]]:
    named = dict(model.named_modules())
    if layers is None:
        return list(named.items())
    unknown = [name for name in layers if name not in named]
    if unknown:
        raise ValueError(f"layers_to_prune: no module named {unknown}; modules: {list(named)}")
    return [(name, named[name]) for name in layers]


def prune_model(
    model: nn.Module,
    pruning_fn: str | Callable[..., Any],
    amount: float | int,
    keys_to_prune: Sequence[str] | None = None,
    layers_to_prune: Sequence[str] | None = None,
    dim: int | None = None,
    l_norm: int | None = None,
) -> nn.Module:
    """Prune tensors of the model's layers in place (``torch.nn.utils.prune`` masks).

    Args:
        model: the model (DP/DDP/compiled wrappers are removed).
        pruning_fn: a name for `get_pruning_fn` or ``fn(module, name, amount)``.
        amount: a fraction (float in [0, 1]) or a number (int) of entries to prune per tensor.
        keys_to_prune: parameter names to prune in each layer (default ``["weight"]``).
        layers_to_prune: module names (as in ``named_modules()``); default: every module
            that has one of `keys_to_prune` as its own parameter.
        dim, l_norm: for the structured methods.

    Returns the pruned (unwrapped) module (Catalyst returned None; the pruning is in place
    either way); `remove_reparametrization` makes it permanent.

    Raises:
        ValueError: for unknown layer names, a named layer without the key, or nothing to prune.
    """
    module = unwrap_module(model)
    fn = get_pruning_fn(pruning_fn, dim=dim, l_norm=l_norm)
    keys = list(keys_to_prune or ["weight"])
    pruned = 0
    for name, layer in _selected(module, layers_to_prune):
        for key in keys:
            if _has_tensor(layer, key):
                fn(layer, name=key, amount=amount)
                pruned += 1
            elif layers_to_prune is not None:
                raise ValueError(f"prune_model: layer {name!r} has no parameter {key!r}")
    if pruned == 0:
        raise ValueError(f"prune_model: no layer has a parameter named {keys}")
    return module


def remove_reparametrization(
    model: nn.Module, keys_to_prune: Sequence[str], layers_to_prune: Sequence[str] | None = None
) -> None:
    """Make pruning permanent: fold the masks into the tensors and drop the pruning hooks."""
    for _, layer in _selected(unwrap_module(model), layers_to_prune):
        for key in keys_to_prune:
            if prune.is_pruned(layer) and f"{key}_orig" in layer._parameters:
                prune.remove(layer, key)
