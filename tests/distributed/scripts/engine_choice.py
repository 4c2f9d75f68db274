"""Which engine a run gets: `--engine device|none|amp-none`; rank 0 writes the engine's class.

ddprun --nproc 2 engine_choice.py --out DIR --engine device      (must fail fast)
"""

import argparse
import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from ddprun import dl


class Plain(dl.Runner):
    def handle_batch(self, batch):
        x, y = batch
        self.batch = {"features": x, "targets": y, "logits": self.model(x)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--engine", choices=["device", "none", "amp-none"], required=True)
    args = parser.parse_args()
    out = Path(args.out)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    loader = DataLoader(TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,))), batch_size=8)
    runner = Plain()
    runner.train(
        model=model,
        criterion=torch.nn.CrossEntropyLoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loaders={"train": loader, "valid": loader},
        engine=dl.DeviceEngine("cpu") if args.engine == "device" else None,
        amp=args.engine == "amp-none",
        callbacks=[
            dl.CriterionCallback(input_key="logits", target_key="targets", metric_key="loss"),
            dl.OptimizerCallback(metric_key="loss"),
        ],
        loggers={},
        logdir=out / "logs",
    )
    if runner.engine.is_master:
        info = {"engine": type(runner.engine).__name__, "world": runner.engine.world_size}
        (out / "engine.json").write_text(json.dumps(info))


if __name__ == "__main__":
    main()
