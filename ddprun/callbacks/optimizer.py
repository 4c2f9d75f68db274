"""OptimizerCallback: backward, clip, step, zero_grad through the engine, with accumulation."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ddprun.callbacks._access import entries, select
from ddprun.core.callback import Callback, CallbackOrder, Event

if TYPE_CHECKING:
    from ddprun.core.runner import IRunner


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


def _trainable(part: Any) -> bool:
    return isinstance(part, torch.nn.Module) and any(p.requires_grad for p in part.parameters())


class OptimizerCallback(Callback):
    """On training loaders: ``engine.backward(loss / k)``; every k-th batch (and the loader's last)
    clip, ``engine.optimizer_step`` and ``engine.zero_grad``.

    Accumulation windows are counted from the loader's start by ``runner.loader_batch_step``
    (batches k, 2k, ... step), so a mid-epoch resume, which restores that counter and the
    accumulated gradients (see ``ddprun.core.resume``), continues inside the same window. A
    window still open when the loader ends (a loader without ``len``, or one left early) is
    stepped in ``on_loader_end``, as the last batch of a sized loader always is: no gradient
    leaks into the next loader or epoch. Its gradients were accumulated without a reduction,
    so the engine reduces them first (``engine.finish_accumulation``: DDP averages them in one
    all-reduce per dtype, FSDP reduce-scatters them).

    DDP decides in the forward pass whether the backward all-reduces, so ``no_sync`` is entered
    in ``on_batch_start`` of an accumulating batch (before `handle_batch` runs the model) and
    left after its backward: those batches communicate nothing, and the step batch's backward
    all-reduces the whole window's gradients.

    `step_count` counts the optimizer steps this callback made; SchedulerCallback(mode="batch")
    reads it to step once per optimizer step rather than per micro-batch.

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
        self.step_count = 0  # optimizer steps made (a plain int: read by SchedulerCallback)
        self._sync_off: contextlib.ExitStack | None = None  # no_sync held open over one batch
        self._direct = False  # per stage: torch's own steps, called directly (on_stage_start)

    def on_stage_start(self, runner: IRunner) -> None:
        self._optimizers = self.optimizers_of(runner)
        model = select(runner.model, self.model_key, "model", "OptimizerCallback")
        # a criterion with trainable parameters is DDP-wrapped like a model (see the DDP
        # engine's prepare_criterion): its gradient sync is skipped and averaged the same way
        criteria = [c for c in entries(runner.criterion).values() if _trainable(c)]
        self._models = [*entries(model).values(), *criteria]
        # every batch steps and the engine's steps are torch's own: call torch directly
        simple = self.accumulation_steps == 1 and self._clip is None
        self._direct = simple and runner.engine.steps_as_torch()

    def optimizers_of(self, runner: IRunner) -> list[torch.optim.Optimizer]:
        """The optimizer(s) this callback steps in `runner`'s current stage."""
        optimizer = select(runner.optimizer, self.optimizer_key, "optimizer", "OptimizerCallback")
        return list(entries(optimizer).values())

    def _accumulating(self, runner: IRunner) -> bool:
        step = runner.loader_batch_step
        return bool(step % self.accumulation_steps) and step != runner.loader_batch_len

    def handles(self, event: Event) -> bool:
        if event is Event.BATCH_START:  # only an accumulation window opens there
            return self.accumulation_steps > 1
        return super().handles(event)

    def on_batch_start(self, runner: IRunner) -> None:
        if self.accumulation_steps > 1 and runner.is_train_loader and self._accumulating(runner):
            self._sync_off = self._no_sync(runner.engine)  # open until this batch's backward

    def on_batch_end(self, runner: IRunner) -> None:
        if not runner.is_train_loader:
            return
        if self._direct:  # what _backward and _step do, without their layers
            metrics = runner.batch_metrics  # read as stored: no __getitem__ call
            loss = dict.get(metrics, self.metric_key) if isinstance(metrics, dict) else None
            if type(loss) is not torch.Tensor:  # missing (an error), deferred, or a subclass
                loss = self._loss(runner)
            loss.backward()
            for optimizer in self._optimizers:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            self.step_count += 1
            return
        sync_off, self._sync_off = self._sync_off, None
        if sync_off is None:  # a step batch (no context object per batch)
            self._backward(runner)
            self._step(runner)
            return
        with sync_off:  # an accumulating batch: gradients stay rank-local
            self._backward(runner)

    def _loss(self, runner: IRunner) -> torch.Tensor:
        metrics = runner.batch_metrics
        if self.metric_key not in metrics:
            raise KeyError(
                f"OptimizerCallback: batch_metrics has no {self.metric_key!r} (have "
                f"{sorted(metrics)}); add a CriterionCallback or set metric_key"
            )
        return metrics[self.metric_key]

    def _backward(self, runner: IRunner) -> None:
        loss = self._loss(runner)
        if self.accumulation_steps > 1:
            loss = loss / self.accumulation_steps
        runner.engine.backward(loss)

    def on_exception(self, runner: IRunner) -> None:
        if self._sync_off is not None:  # the batch failed before its backward
            self._sync_off.close()
            self._sync_off = None

    def on_loader_end(self, runner: IRunner) -> None:
        if not runner.is_train_loader:
            return
        if self._accumulating(runner):
            # an open window: gradients of its batches wait, unreduced, for a step
            runner.engine.finish_accumulation(self._models)
            self._step(runner)

    def _no_sync(self, engine: Any) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        for model in self._models:
            stack.enter_context(engine.no_sync(model))
        return stack

    def _step(self, runner: IRunner) -> None:
        engine = runner.engine
        for optimizer in self._optimizers:
            if self._clip is not None:
                engine.unscale_gradients(optimizer)
                params = [p for group in optimizer.param_groups for p in group["params"]]
                self._clip(params)
            engine.optimizer_step(optimizer)
            engine.zero_grad(optimizer)
        self.step_count += 1
