"""Model utilities with Catalyst 21.12's names and signatures (``ddprun.utils.<name>``):
checkpoint averaging (`averaging`), tracing and ONNX export (`export`), dynamic quantization and
pruning (`compress`).

Every function accepts a model wrapped in DataParallel, DistributedDataParallel or
``torch.compile`` and works on the plain module inside. ``onnx`` is imported only by
`onnx_export` (the ``ddprun[onnx]`` extra); nothing here is imported by ``import ddprun``.
"""

from ddprun.model_tools.averaging import average_weights, get_averaged_weights_by_path_mask
from ddprun.model_tools.compress import (
    get_pruning_fn,
    prune_model,
    quantize_model,
    remove_reparametrization,
)
from ddprun.model_tools.export import onnx_export, trace_model

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
