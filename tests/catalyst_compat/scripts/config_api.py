"""The Config API from a YAML file (issue 12, item 7), as a user runs it: plain python, or
``python -m ddprun --nproc 2 config_api.py``. Registers its own dataset and runner class, builds
the runner the config's ``runner`` section names and runs both stages; rank 0 writes what
happened to ``<out>/result.json``.

Usage: config_api.py --out DIR [--config PATH] [--logdir DIR] [--ddp]
(``--ddp`` sets ``args.ddp``: under plain python the DDP engine spawns 2 workers, and this
parent process reports the model it gets back.)
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ddprun import dl, utils
from ddprun.registry import REGISTRY

HERE = Path(__file__).resolve().parent


@REGISTRY.add
class Blobs(Dataset):
    """`size` points of 6 features, labelled by the largest of the first 3 (seeded)."""

    def __init__(self, size: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.features = torch.randn(size, 6, generator=generator)
        self.targets = self.features[:, :3].argmax(dim=1)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features[index], self.targets[index]


@REGISTRY.add
class FreezingConfigRunner(dl.SupervisedConfigRunner):
    """Catalyst's mnist_stages pattern: the first layer is frozen in the stage "frozen"."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.report: dict = {"history": [], "stages": {}, "batch_sizes": {}}
        self._previous = None

    def get_model(self, stage: str):
        model = super().get_model(stage)
        utils.set_requires_grad(model, {"0": stage != "frozen"})
        return model

    def on_stage_start(self, runner) -> None:
        model = self.engine.unwrap(self.model)
        self.report["stages"][self.stage_key] = {
            "optimizer": type(self.optimizer).__name__,
            "lr": [group["lr"] for group in self.optimizer.param_groups],
            "weight_decay": [group["weight_decay"] for group in self.optimizer.param_groups],
            "callbacks": sorted(type(cb).__name__ for cb in self.callbacks.values()),
            "same_model_as_before": model is self._previous,
            "start": _state(model),
        }

    def on_loader_start(self, runner) -> None:
        self.report["batch_sizes"][self.loader_key] = self.loader_batch_size

    def on_epoch_end(self, runner) -> None:
        self.report["history"].append(
            {"stage": self.stage_key, "epoch": self.global_epoch_step, **self.epoch_metrics}
        )

    def on_stage_end(self, runner) -> None:
        self._previous = self.engine.unwrap(self.model)
        self.report["stages"][self.stage_key]["end"] = _state(self._previous)


def _state(model: torch.nn.Module) -> dict[str, list]:
    return {key: value.detach().cpu().tolist() for key, value in model.state_dict().items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--config", default=str(HERE / "config_api.yml"))
    parser.add_argument("--logdir", default=None)
    parser.add_argument("--ddp", action="store_true")
    args = parser.parse_args()
    config = utils.load_config(args.config)
    if args.logdir is not None:
        config["args"]["logdir"] = args.logdir
    config["args"]["ddp"] = args.ddp
    runner = dl.ConfigRunner.from_config(config)
    runner.run()
    if int(os.environ.get("RANK", "0")) == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        report = {**runner.report, "engine": type(runner.engine).__name__}
        report["runner"] = type(runner).__name__
        report["final"] = _state(runner.engine.unwrap(runner.model))
        (out / "result.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
