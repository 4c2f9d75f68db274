"""Shared pieces of the control-callback tests: data with sample ids, a runner, a recorder."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ddprun import dl


def data(n=40, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=generator)
    return TensorDataset(x, x[:, :3].argmax(dim=1), torch.arange(n))


class StepRunner(dl.Runner):
    def handle_batch(self, batch):
        x, y, ids = batch
        logits = self.model(x)
        onehot = nn.functional.one_hot(y, 3).float()
        self.batch = {"features": x, "logits": logits, "targets": y, "onehot": onehot, "ids": ids}


class Passes(dl.Callback):
    """Records (stage epoch, loader, sample ids) of every loader pass, and runner.loaders."""

    def __init__(self, order=dl.CallbackOrder.ExternalExtra):
        super().__init__(order=order)
        self.passes, self.loaders_at_epoch_end = [], []

    def on_stage_start(self, runner):
        self.stage_loaders = dict(runner.loaders)  # as prepared by the engine

    def on_loader_start(self, runner):
        self.ids = []

    def on_batch_end(self, runner):
        self.ids.extend(runner.batch["ids"].tolist())

    def on_loader_end(self, runner):
        self.passes.append((runner.stage_epoch_step, runner.loader_key, self.ids))

    def on_epoch_end(self, runner):
        self.loaders_at_epoch_end.append(dict(runner.loaders))

    def ran(self):
        return [(epoch, key, len(ids)) for epoch, key, ids in self.passes]


def train(callbacks, loaders=None, num_epochs=2, criterion=None, **kwargs):
    loaders = loaders or {"train": DataLoader(data(), 8), "valid": DataLoader(data(20, 1), 8)}
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    runner = StepRunner()
    runner.train(
        model=model,
        criterion=criterion or {"ce": nn.CrossEntropyLoss(), "bce": nn.BCEWithLogitsLoss()},
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loaders=loaders,
        callbacks=callbacks,
        loggers={},
        num_epochs=num_epochs,
        engine=dl.DeviceEngine("cpu"),
        **kwargs,
    )
    return runner


def losses():
    return [
        dl.CriterionCallback("logits", "targets", "loss_ce", criterion_key="ce"),
        dl.CriterionCallback("logits", "onehot", "loss_bce", criterion_key="bce"),
    ]
