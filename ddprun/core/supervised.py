"""SupervisedRunner: a Runner whose step is ``batch -> model -> outputs`` by key names.

A batch that is a 2-tuple or 2-list becomes ``{input_key: batch[0], target_key: batch[1]}``
(before the callbacks' ``on_batch_start``); a dict batch is used as it is. ``handle_batch``
stores ``{**batch, **forward(batch)}`` in ``runner.batch``, so callbacks find inputs, targets
and outputs under their keys. `train` adds, when the components are given and no callback of
that kind is: a CriterionCallback (outputs -> `loss_key`) for a criterion module (or a dict
of them: the first entry, as CriterionCallback takes one), an OptimizerCallback (on
`loss_key`, stepping every optimizer of a dict) and, as every Runner, a SchedulerCallback.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ddprun.core.callback import Callback
from ddprun.core.runner import IRunner, RunnerError
from ddprun.core.runner_train import Runner
from ddprun.defaults import callback_class, has_callback

Keys = str | Sequence[str] | None


class SupervisedRunner(Runner):
    """Runner for ``model(inputs) -> outputs`` steps, named by keys.

    Args:
        model, engine: as for `Runner`.
        input_key: the batch key fed to the model; a list of keys passes them as keyword
            arguments (``model(**{k: batch[k]})``); None passes the whole batch dict.
        output_key: where the output goes; a list names each element of a returned tuple;
            None expects the model to return a dict.
        target_key: the targets' key (the second element of a 2-tuple batch).
        loss_key: the loss's key in ``batch_metrics`` (CriterionCallback / OptimizerCallback).
    """

    def __init__(
        self,
        model: Any = None,
        engine: Any = None,
        input_key: Keys = "features",
        output_key: Keys = "logits",
        target_key: str = "targets",
        loss_key: str = "loss",
    ) -> None:
        super().__init__(model=model, engine=engine)
        _check_keys("input_key", input_key)
        _check_keys("output_key", output_key)
        self._input_key, self._output_key = input_key, output_key
        self._target_key, self._loss_key = target_key, loss_key

    # --------------------------------------------------------------- the step
    def _process_batch(self, batch: Any) -> Any:
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            key = self._input_key
            key = key if isinstance(key, str) else self._input_key_for_tuple()
            return {key: batch[0], self._target_key: batch[1]}
        return batch

    def _input_key_for_tuple(self) -> str:
        if isinstance(self._input_key, str):
            return self._input_key
        raise RunnerError(
            f"a 2-tuple batch needs a single input_key to name its first element, got "
            f"input_key={self._input_key!r}; give the loader dict batches instead"
        )

    def on_batch_start(self, runner: IRunner) -> None:
        """A 2-tuple batch becomes ``{input_key: ..., target_key: ...}`` before the callbacks."""
        batch, key = self.batch, self._input_key
        if type(batch) is list and len(batch) == 2 and type(key) is str:  # the loader's pair
            self.batch = {key: batch[0], self._target_key: batch[1]}
        elif type(batch) is not dict:  # anything else but a dict, or an error naming it
            self.batch = self._process_batch(batch)

    def forward(self, batch: Mapping[str, Any], **kwargs: Any) -> dict[str, Any]:
        """The model's outputs for `batch`, as a dict keyed by `output_key`."""
        if type(batch) is not dict and not isinstance(batch, Mapping):
            raise RunnerError(
                f"SupervisedRunner expects a dict batch or a 2-tuple (inputs, targets), got a "
                f"{type(batch).__name__}"
            )
        key = self._input_key
        if isinstance(key, str):
            output = self.model(batch[key] if key in batch else _get(batch, key), **kwargs)
        elif self._input_key is None:
            output = self.model(**batch, **kwargs)
        else:
            output = self.model(**{key: _get(batch, key) for key in self._input_key}, **kwargs)
        if isinstance(self._output_key, str):  # the common case without a call
            return {self._output_key: output}
        return self._outputs(output)

    def _outputs(self, output: Any) -> dict[str, Any]:
        """The outputs dict for `output_key` None (a dict output) or a list of keys."""
        if self._output_key is None:
            if not isinstance(output, Mapping):
                raise RunnerError(
                    f"output_key=None expects the model to return a dict, got a "
                    f"{type(output).__name__}"
                )
            return dict(output)
        if not isinstance(output, (tuple, list)) or len(output) != len(self._output_key):
            raise RunnerError(
                f"output_key={list(self._output_key)} names {len(self._output_key)} outputs, "
                f"but the model returned {_describe(output)}"
            )
        return dict(zip(self._output_key, output))

    def handle_batch(self, batch: Mapping[str, Any]) -> None:
        """``runner.batch = {**batch, **forward(batch)}``."""
        self.batch = {**batch, **self.forward(batch)}

    def predict_batch(self, batch: Any, **kwargs: Any) -> dict[str, Any]:
        """The outputs dict for one batch (a dict or a 2-tuple), on the engine's device."""
        batch = self.engine.move(self._process_batch(batch))
        return self.forward(batch, **kwargs)

    # ------------------------------------------------------------------ train
    def _component_callbacks(self, callbacks: dict[str, Callback]) -> dict[str, Callback]:
        criterion, optimizer = self._criterion, self._optimizer
        # has_callback sees through ControlFlowCallback wrappers
        if _is_component(criterion, nn.Module) and not has_callback(callbacks, "criterion"):
            callbacks["_criterion"] = callback_class("criterion")(
                input_key=self._first_output_key(),
                target_key=self._target_key,
                metric_key=self._loss_key,
                criterion_key=next(iter(criterion)) if isinstance(criterion, Mapping) else None,
            )
        optimizing = _is_component(optimizer, torch.optim.Optimizer)
        if optimizing and not has_callback(callbacks, "optimizer"):
            callbacks["_optimizer"] = callback_class("optimizer")(metric_key=self._loss_key)
        return callbacks

    def _first_output_key(self) -> str:
        if isinstance(self._output_key, str):
            return self._output_key
        if self._output_key:
            return self._output_key[0]
        raise RunnerError(
            "output_key=None: the criterion's input key is unknown; add "
            "dl.CriterionCallback(input_key=..., target_key=...) yourself"
        )


def _is_component(obj: Any, kind: type) -> bool:
    if isinstance(obj, Mapping):
        return bool(obj) and all(isinstance(value, kind) for value in obj.values())
    return isinstance(obj, kind)


def _check_keys(name: str, keys: Keys) -> None:
    if keys is None or isinstance(keys, str):
        return
    if not isinstance(keys, Sequence) or not all(isinstance(k, str) for k in keys):
        raise TypeError(f"{name} must be a str, a list of str or None, got {keys!r}")


def _get(batch: Mapping[str, Any], key: str) -> Any:
    try:
        return batch[key]
    except KeyError:
        raise KeyError(
            f"SupervisedRunner: the batch has no {key!r} (have {sorted(batch)}); set input_key"
        ) from None


def _describe(output: Any) -> str:
    if isinstance(output, (tuple, list)):
        return f"a {type(output).__name__} of {len(output)}"
    return f"a {type(output).__name__}"
