"""``python spawn_train.py LOGDIR``: Runner.train(fsdp=True, amp=True) under plain python, so the
FSDP engine spawns 2 workers (bf16 parameters on CPU); the parent then writes what it holds:
``parent.json`` with its model's state (rank 0's gathered weights) and its engine's repr, and
``predictions.pt`` from ``predict_loader`` on the valid set."""

import json
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ddprun import dl


class SpawnRunner(dl.Runner):
    def handle_batch(self, batch):
        features, targets = batch
        self.batch = {"features": features, "targets": targets, "logits": self.model(features)}

    def predict_batch(self, batch, **kwargs):
        return self.model(batch[0])


def main(logdir: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(192, 8, generator=generator)
    y = (x @ torch.randn(8, 4, generator=generator)).argmax(dim=1)
    train, valid = TensorDataset(x[:128], y[:128]), TensorDataset(x[128:], y[128:])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    runner = SpawnRunner()
    runner.train(
        model=model,
        loaders={"train": DataLoader(train, batch_size=16), "valid": DataLoader(valid, 16)},
        criterion=nn.CrossEntropyLoss(),
        optimizer=torch.optim.Adam(model.parameters(), lr=0.01),
        callbacks=[
            dl.CriterionCallback(input_key="logits", target_key="targets"),
            dl.OptimizerCallback(metric_key="loss"),
        ],
        logdir=logdir,
        num_epochs=2,
        fsdp=True,
        amp=True,
    )
    state = {k: v.tolist() for k, v in runner.model.state_dict().items()}
    parent = {"engine": repr(runner.engine), "state": state}
    (logdir / "parent.json").write_text(json.dumps(parent))
    loader = DataLoader(valid, batch_size=16)
    predictions = torch.cat(list(runner.predict_loader(loader=loader)))
    torch.save(predictions, logdir / "predictions.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
