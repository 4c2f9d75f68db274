"""OptimizerCallback: backward, clip, step, zero_grad through the engine, with accumulation."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import torch

from ddprun.callbacks._access import entries, select
from ddprun.core.callback import Callback, CallbackOrder


def _resolve_clip(fn: Callable | str | None, params: dict[str, Any] | None) -> Callable | None:
    if fn is None:
        return None
    if isinstance(fn, str):
        if not hasattr(torch.nn.utils, fn):
            raise ValueError(
                f"grad_clip_fn={fn!r} is not in torch.nn.utils (e.g. 'clip_grad_norm_')"
            )
        fn = getattr(torch.nn.utils, fn)
    # a partial, not a lambda: callbacks must pickle for spawned DDP workers
    return functools.partial(fn, **dict(params or {}))


class OptimizerCallback(Callback):
    """On training loaders: ``engine.backward(loss / k)``; every k-th batch (and the loader's last)
    clip, ``engine.optimizer_step`` and ``engine.zero_grad``.

    Args:
        metric_key: the loss in ``batch_metrics``.
        model_key: with a dict model, the entry whose gradient sync `no_sync` skips on
            accumulating batches (default: every entry).
        optimizer_key: with a dict optimizer, the entry to step (default: every entry).
        accumulation_steps: k; the loss is scaled by 1/k so accumulated gradients average.
        grad_clip_fn: a callable ``fn(parameters, **grad_clip_params)`` or a name in
            ``torch.nn.utils``; applied only on step batches, after unscaling (AMP).
        grad_clip_params: keyword arguments for `grad_clip_fn` (e.g. ``{"max_norm": 1.0}``).
    """

    def __init__(
        self,
        metric_key: str = "loss",
        model_key: str | None = None,
        optimizer_key: str | None = None,
        accumulation_steps: int = 1,
        grad_clip_fn: Callable | str | None = None,
        grad_clip_params: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(order=CallbackOrder.Optimizer)
        if accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be >= 1, got {accumulation_steps}")
        self.metric_key, self.model_key, self.optimizer_key = metric_key, model_key, optimizer_key
        self.accumulation_steps = int(accumulation_steps)
        self._clip = _resolve_clip(grad_clip_fn, grad_clip_params)
        self._optimizers: list[torch.optim.Optimizer] = []
        self._models: list[Any] = []
        self._accumulated = 0

    def on_stage_start(self, runner: Any) -> None:
        optimizer = select(runner.optimizer, self.optimizer_key, "optimizer", "OptimizerCallback")
        self._optimizers = list(entries(optimizer).values())
        model = select(runner.model, self.model_key, "model", "OptimizerCallback")
        self._models = list(entries(model).values())

    def on_loader_start(self, runner: Any) -> None:
        self._accumulated = 0

    def on_batch_end(self, runner: Any) -> None:
        if not runner.is_train_loader:
            return
        if self.metric_key not in runner.batch_metrics:
            raise KeyError(
                f"OptimizerCallback: batch_metrics has no {self.metric_key!r} "
                f"(have {sorted(runner.batch_metrics)}); add a CriterionCallback or set metric_key"
            )
        loss = runner.batch_metrics[self.metric_key]
        if self.accumulation_steps > 1:
            loss = loss / self.accumulation_steps
        self._accumulated += 1
        last_batch = runner.loader_batch_step == runner.loader_batch_len
        if self._accumulated % self.accumulation_steps and not last_batch:
            with self._no_sync(runner.engine):
                runner.engine.backward(loss)
            return
        runner.engine.backward(loss)
        self._step(runner)

    def _no_sync(self, engine: Any) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        for model in self._models:
            stack.enter_context(engine.no_sync(model))
        return stack

    def _step(self, runner: Any) -> None:
        engine = runner.engine
        for optimizer in self._optimizers:
            if self._clip is not None:
                engine.unscale_gradients(optimizer)
                params = [p for group in optimizer.param_groups for p in group["params"]]
                self._clip(params)
            engine.optimizer_step(optimizer)
            engine.zero_grad(optimizer)
