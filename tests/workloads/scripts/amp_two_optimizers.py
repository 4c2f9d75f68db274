"""fp16 AMP (GradScaler) with two optimizers, with gradient clipping.

    python amp_two_optimizers.py --out DIR --mode plain          (torch's documented recipe)
    python amp_two_optimizers.py --out DIR --mode runner         (ddprun, one process)
    ddprun --nproc 2 amp_two_optimizers.py --out DIR --mode ddp  (ddprun, 2 ranks, batch 8)

torch's recipe for several optimizers: one scaled backward, unscale each (to clip), step each,
then one `scaler.update()` per iteration. The scaler grows every iteration (growth_interval=1),
so an update per optimizer would show at once. Rank 0 writes the weights, the final scale and
the number of scale growths.
"""

import argparse
import json
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ddprun import dl

SCALER = {"init_scale": 2.0**8, "growth_interval": 1}


def data():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=generator)
    return TensorDataset(x, (x[:, :3].argmax(dim=1)).long())


def build():
    torch.manual_seed(0)
    model = {"encoder": nn.Linear(6, 8), "head": nn.Linear(8, 3)}
    optimizer = {
        "encoder": torch.optim.SGD(model["encoder"].parameters(), lr=0.1),
        "head": torch.optim.SGD(model["head"].parameters(), lr=0.1),
    }
    return model, optimizer


def dump(out: Path, model, scale: float) -> None:
    weights = {f"{k}.{n}": v.tolist() for k, m in model.items() for n, v in m.state_dict().items()}
    (out / "result.json").write_text(json.dumps({"weights": weights, "scale": scale}))


def plain(out: Path, epochs: int) -> None:
    model, optimizer = build()
    scaler = torch.amp.GradScaler("cpu", **SCALER)
    for _ in range(epochs):
        for x, y in DataLoader(data(), batch_size=16):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = nn.functional.cross_entropy(model["head"](model["encoder"](x)), y)
            scaler.scale(loss).backward()
            for key in ("encoder", "head"):
                scaler.unscale_(optimizer[key])
                torch.nn.utils.clip_grad_norm_(model[key].parameters(), max_norm=1.0)
                scaler.step(optimizer[key])
                optimizer[key].zero_grad(set_to_none=True)
            scaler.update()
    dump(out, model, scaler.get_scale())


class TwoPartRunner(dl.Runner):
    def handle_batch(self, batch):
        x, y = batch
        logits = self.model["head"](self.model["encoder"](x))
        self.batch = {"features": x, "targets": y, "logits": logits}


class Dump(dl.Callback):
    def __init__(self, out: Path):
        super().__init__(order=dl.CallbackOrder.ExternalExtra)
        self.out = out

    def on_experiment_end(self, runner):
        if runner.engine.is_master:
            scale = runner.engine.precision.scaler.get_scale()
            dump(self.out, runner.engine.unwrap(runner.model), scale)


def with_runner(out: Path, epochs: int, ddp: bool) -> None:
    model, optimizer = build()
    if ddp:
        engine = dl.DistributedDataParallelAMPEngine(dtype="fp16", scaler_kwargs=SCALER)
    else:
        engine = dl.AMPEngine("cpu", dtype="fp16", scaler_kwargs=SCALER)
    TwoPartRunner().train(
        model=model,
        optimizer=optimizer,
        criterion=nn.CrossEntropyLoss(),
        loaders={"train": DataLoader(data(), batch_size=8 if ddp else 16)},
        engine=engine,
        callbacks=[
            dl.CriterionCallback(input_key="logits", target_key="targets", metric_key="loss"),
            dl.OptimizerCallback(
                metric_key="loss",
                grad_clip_fn="clip_grad_norm_",
                grad_clip_params={"max_norm": 1.0},
            ),
            Dump(out),
        ],
        loggers={},
        num_epochs=epochs,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--mode", choices=["plain", "runner", "ddp"], required=True)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.mode == "plain":
        plain(out, args.epochs)
    else:
        with_runner(out, args.epochs, ddp=args.mode == "ddp")


if __name__ == "__main__":
    main()
