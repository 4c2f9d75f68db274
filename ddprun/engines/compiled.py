"""torch.compile and the engines' wrappers: the order they go in and how they come off.

A compiled model is an ``OptimizedModule`` around the user's module. Engines wrap the original
module (DDP, DataParallel) and compile the wrapper again with the same options: the order torch
recommends for DDP, where the compiled DDP module lets DDPOptimizer split the graph at gradient
bucket boundaries so all-reduces overlap the backward pass.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from torch import nn

_PARALLEL = (nn.DataParallel, nn.parallel.DistributedDataParallel)


def compiled_module_type() -> type | None:
    """torch.compile's ``OptimizedModule`` class, or None while torch._dynamo is not loaded
    (then nothing can be compiled, and importing it would cost about a second)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return getattr(eval_frame, "OptimizedModule", None)


def _same(module: Any) -> Any:
    return module


def split_compiled(module: Any) -> tuple[Any, Callable[[Any], Any]]:
    """The plain module inside every wrapper (torch.compile, DataParallel, DDP), and a function
    that compiles a module again as the outermost torch.compile found did (same backend, mode
    and options); that function returns its argument unchanged when nothing was compiled.

    Compiling the plain module again gives back the user's own compiled object.
    """
    compiled_type = compiled_module_type()
    outer = None
    while True:
        if compiled_type is not None and isinstance(module, compiled_type):
            outer = outer if outer is not None else module
            module = module._orig_mod
        elif isinstance(module, _PARALLEL):
            module = module.module
        else:
            break
    if outer is None:
        return module, _same

    def compile_again(inner: Any) -> Any:
        return outer if outer._orig_mod is inner else outer.dynamo_ctx(inner)

    return module, compile_again


def strip_parallel(module: Any) -> Any:
    """`module` without DataParallel/DDP wrappers; a compiled model stays compiled, with its
    compilation around the plain module."""
    plain, compile_again = split_compiled(module)
    return compile_again(plain)
