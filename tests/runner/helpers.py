"""Shared pieces of the runner tests: tiny data, a supervised runner, a recording callback."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ddprun import dl

CPU = "cpu"
EVENTS = (
    "on_experiment_start",
    "on_stage_start",
    "on_epoch_start",
    "on_loader_start",
    "on_batch_start",
    "on_batch_end",
    "on_loader_end",
    "on_epoch_end",
    "on_stage_end",
    "on_experiment_end",
    "on_exception",
)


def dataset(num_samples: int = 40, in_features: int = 4, out_features: int = 1, seed: int = 0):
    """A regression TensorDataset of random features and targets."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(num_samples, in_features, generator=generator)
    targets = torch.randn(num_samples, out_features, generator=generator)
    return TensorDataset(features, targets)


def loader(num_samples: int = 40, batch_size: int = 16, seed: int = 0, **kwargs: Any) -> DataLoader:
    """A DataLoader over `dataset(num_samples, seed=seed)` (no shuffling unless asked)."""
    kwargs.setdefault("shuffle", False)
    return DataLoader(dataset(num_samples, seed=seed), batch_size=batch_size, **kwargs)


def loaders(train: int = 40, valid: int = 24, batch_size: int = 16) -> dict[str, DataLoader]:
    """``{"train": 40 samples, "valid": 24 samples}`` by default, batch size 16."""
    return {"train": loader(train, batch_size, seed=0), "valid": loader(valid, batch_size, seed=1)}


def linear(seed: int = 0, in_features: int = 4, out_features: int = 1) -> nn.Linear:
    """A Linear layer with seeded weights."""
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features)


def engine() -> dl.DeviceEngine:
    return dl.DeviceEngine(CPU)


class SupervisedRunner(dl.Runner):
    """handle_batch: ``{"features", "targets", "logits"}``; predict_batch: the logits."""

    def handle_batch(self, batch: Sequence[torch.Tensor]) -> None:
        features, targets = batch
        self.batch = {"features": features, "targets": targets, "logits": self.model(features)}

    def predict_batch(self, batch: Sequence[torch.Tensor], **kwargs: Any) -> torch.Tensor:
        return self.model(batch[0].to(self.device))


class ScriptedMetricRunner(SupervisedRunner):
    """Also logs ``score``: ``scores[stage_epoch_step - 1]`` on every batch of every loader."""

    def __init__(self, scores: Sequence[float] | dict[str, Sequence[float]]) -> None:
        super().__init__()
        self.scores = scores

    def handle_batch(self, batch: Sequence[torch.Tensor]) -> None:
        super().handle_batch(batch)
        scores = self.scores[self.stage_key] if isinstance(self.scores, dict) else self.scores
        self.batch_metrics["score"] = float(scores[self.stage_epoch_step - 1])


def supervised_callbacks(**optimizer_kwargs: Any) -> dict[str, dl.Callback]:
    return {
        "criterion": dl.CriterionCallback(input_key="logits", target_key="targets"),
        "optimizer": dl.OptimizerCallback(metric_key="loss", **optimizer_kwargs),
    }


class Recorder(dl.Callback):
    """Appends ``(name, event, snapshot(runner))`` to `log` for every event."""

    def __init__(
        self,
        log: list,
        name: str = "rec",
        order: int = dl.CallbackOrder.External,
        node: int = dl.CallbackNode.all,
        snapshot: Callable[[str, Any], Any] | None = None,
    ) -> None:
        super().__init__(order=order, node=node)
        self.log, self.name = log, name
        self.snapshot = snapshot or (lambda event, runner: None)

    def _record(self, event: str, runner: Any) -> None:
        self.log.append((self.name, event, self.snapshot(event, runner)))


def _make_event_method(event: str) -> Callable[[Recorder, Any], None]:
    def method(self: Recorder, runner: Any) -> None:
        self._record(event, runner)

    method.__name__ = event
    return method


for _event in EVENTS:
    setattr(Recorder, _event, _make_event_method(_event))


def state_of(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of `module`'s state dict."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key
