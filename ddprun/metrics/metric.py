"""The stateful `Metric` base: named tensor states, each declared once with its cross-rank reduction."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = ["REDUCTIONS", "Metric", "Reduction"]

Reduction = Literal["sum", "max", "min", "cat"]
REDUCTIONS: tuple[str, ...] = ("sum", "max", "min", "cat")


class Metric(ABC):
    """Owns a metric's running state: tensors declared by `add_state`, each with how ranks combine it.

    A subclass declares its states in `__init__` with `add_state(name, default, reduction)`; each
    state is then an attribute holding a tensor on the metric's device. `update()` folds a batch
    into the states in place and must not sync with the host; `compute()` turns the states into
    values (and may sync). The reduction tells `ddprun.metrics.sync.synchronized` how to combine the
    states of all ranks: "sum", "max" and "min" are element-wise over same-shaped tensors, "cat"
    concatenates tensors whose first dimension may differ between ranks.

    Args:
        compute_on_call: whether calling the metric returns `compute()` (True) or the result of
            `update()` (False).
    """

    def __init__(self, compute_on_call: bool = True) -> None:
        self.compute_on_call = compute_on_call
        self._defaults: dict[str, Tensor] = {}
        self._reductions: dict[str, str] = {}
        self._device = torch.device("cpu")
        # host-side counts not yet added to their states (see `count_later`)
        self._pending: dict[str, int | float] = {}

    def add_state(self, name: str, default: Tensor, reduction: Reduction) -> None:
        """Declares a state: its initial value (restored by `reset`) and its cross-rank reduction.

        Args:
            name: attribute name of the state.
            default: initial value; for "cat" states a tensor whose first dimension is the one
                that grows (usually 0 long).
            reduction: one of "sum", "max", "min", "cat".

        Raises:
            ValueError: for an unknown reduction, a name already taken, or a 0-dim "cat" default.
        """
        if reduction not in REDUCTIONS:
            raise ValueError(
                f"state {name!r}: reduction must be one of {REDUCTIONS}, got {reduction!r}"
            )
        if name in self._defaults or hasattr(type(self), name):
            raise ValueError(f"state {name!r} is already declared or shadows a method")
        if reduction == "cat" and default.dim() == 0:
            raise ValueError(f"state {name!r}: a 'cat' state needs a first dimension to grow")
        self._defaults[name] = default.detach().to(self._device).clone()
        self._reductions[name] = reduction
        setattr(self, name, self._defaults[name].clone())

    @property
    def device(self) -> torch.device:
        """The device every state lives on."""
        return self._device

    @property
    def reductions(self) -> Mapping[str, str]:
        """Each state's name mapped to its reduction, in declaration order."""
        return dict(self._reductions)

    def count_later(self, name: str, amount: int | float) -> None:
        """Add a host number (a sample count) to the "sum" state `name` without a tensor op per
        call: it is added to the tensor when the states are read (`get_states`, `compute`
        through `fold_pending`), so every reader sees it."""
        pending = self.__dict__.setdefault("_pending", {})
        pending[name] = pending.get(name, 0) + amount

    def fold_pending(self) -> None:
        """Add the counts given to `count_later` to their states (one op per state)."""
        pending = self.__dict__.get("_pending")  # None: a subclass that skipped our __init__
        if pending:
            for name, amount in pending.items():
                getattr(self, name).add_(amount)
            pending.clear()

    def get_states(self) -> dict[str, Tensor]:
        """The current state tensors by name (the tensors themselves, not copies)."""
        self.fold_pending()
        return {name: getattr(self, name) for name in self._reductions}

    def replace_states(self, states: Mapping[str, Tensor]) -> None:
        """Points the named states at the given tensors, without copying (used by the sync layer).

        Raises:
            KeyError: for a name that is not a declared state.
        """
        self.fold_pending()  # into the states being replaced (the sync layer restores them)
        for name, value in states.items():
            if name not in self._reductions:
                raise KeyError(f"{type(self).__name__} has no state {name!r}")
            setattr(self, name, value)

    def state_dict(self) -> dict[str, Tensor]:
        """Detached copies of the states, for checkpoints."""
        return {name: value.detach().clone() for name, value in self.get_states().items()}

    def load_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Restores states saved by `state_dict`, onto this metric's device."""
        self.replace_states({k: v.to(self._device).clone() for k, v in state_dict.items()})

    def reset(self) -> None:
        """Returns every state to its declared default."""
        self.__dict__.get("_pending", {}).clear()
        for name, default in self._defaults.items():
            state = getattr(self, name)
            if state.shape == default.shape and state.device == default.device:
                # Copying in place keeps the storage, so a reset per loader allocates nothing.
                state.copy_(default)
            else:
                setattr(self, name, default.clone())

    def to(self, device: torch.device | str) -> Metric:
        """Moves every state (and its default) to `device`.

        Returns:
            self, so that `metric = Metric(...).to(device)` works.
        """
        self._device = torch.device(device)
        self._defaults = {k: v.to(self._device) for k, v in self._defaults.items()}
        for name, value in self.get_states().items():
            setattr(self, name, value.to(self._device))
        return self

    @abstractmethod
    def update(self, *args: Any, **kwargs: Any) -> Any:
        """Folds one batch into the states, in place and without a host sync."""

    @abstractmethod
    def compute(self) -> Any:
        """The metric's value(s) from the current states."""

    @abstractmethod
    def compute_key_value(self) -> dict[str, float]:
        """The metric's scalar values by key, for `loader_metrics` and loggers."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Updates with one batch, then returns `compute()` or, without `compute_on_call`, the update's result."""
        value = self.update(*args, **kwargs)
        return self.compute() if self.compute_on_call else value
