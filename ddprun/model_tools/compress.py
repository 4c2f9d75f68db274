"""Making a model smaller: dynamic quantization and pruning (``ddprun.utils.quantize_model``,
``prune_model``, ``get_pruning_fn``, ``remove_reparametrization``).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from ddprun.checkpoint import unwrap_module

__all__ = ["get_pruning_fn", "prune_model", "quantize_model", "remove_reparametrization"]


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
