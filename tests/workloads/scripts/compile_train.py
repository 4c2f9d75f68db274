"""A compiled model (torch.compile) trained next to the same model uncompiled, from one start.

    python compile_train.py --out DIR --engine device|amp|ddp [--backend B] [--dict]
    ddprun --nproc 2 compile_train.py --out DIR --engine ddp|ddp_amp [--backend B] [--dict]

``ddp``/``ddp_amp`` under plain python spawn 2 workers. One epoch, unshuffled: 2 ranks x batch 8
see the same samples per step as 1 x batch 16. ``--dict`` passes the model as ``{"net": ...}``.
Each training writes a checkpoint (DIR/logs_plain, DIR/logs_compiled); every process (``tag``:
"main" or "rank<N>") writes ``weights_{plain,compiled}_<tag>.pt`` (plain state dicts) and
``model_<tag>.json`` (what ``runner.model`` is after the compiled training); each training
process writes the wrapper chain it trained (``logs_<kind>_chain_<tag>.json``).
"""

import argparse
import json
import os
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ddprun import dl
from ddprun.checkpoint import unwrap_module

ENGINES = {
    "device": lambda: dl.DeviceEngine("cpu"),
    "amp": lambda: dl.AMPEngine("cpu"),
    "ddp": lambda: dl.DistributedDataParallelEngine(world_size=2),
    "ddp_amp": lambda: dl.DistributedDataParallelAMPEngine(world_size=2),
}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))


class NetRunner(dl.Runner):
    def handle_batch(self, batch):
        x, y = batch
        model = self.model["net"] if isinstance(self.model, dict) else self.model
        self.batch = {"logits": model(x), "targets": y}


class RecordWrapping(dl.Callback):
    """Writes the wrapper chain of the model being trained (outermost first) to
    ``<logdir>_chain_<tag>.json``, the tag of the process that trains (a spawned worker's)."""

    def __init__(self, logdir: Path):
        super().__init__(order=dl.CallbackOrder.ExternalExtra)
        self.logdir = logdir

    def on_stage_start(self, runner):
        module, chain = runner.model["net"] if isinstance(runner.model, dict) else runner.model, []
        while True:
            chain.append(type(module).__name__)
            inner = module._modules.get("_orig_mod") or module._modules.get("module")
            if inner is None:
                break
            module = inner
        path = self.logdir.parent / f"{self.logdir.name}_chain_{_tag()}.json"
        path.write_text(json.dumps(chain))


def train(model, engine_name: str, batch_size: int, logdir: Path) -> NetRunner:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=generator)
    loader = DataLoader(TensorDataset(x, x[:, :3].argmax(dim=1)), batch_size=batch_size)
    params = unwrap_module(model["net"] if isinstance(model, dict) else model).parameters()
    runner = NetRunner()
    runner.train(
        model=model,
        criterion=nn.CrossEntropyLoss(),
        optimizer=torch.optim.SGD(params, lr=0.5),
        loaders={"train": loader},
        engine=ENGINES[engine_name](),
        callbacks=[
            dl.CriterionCallback(input_key="logits", target_key="targets", metric_key="loss"),
            dl.OptimizerCallback(metric_key="loss"),
            dl.CheckpointCallback(logdir=logdir, loader_key="train", metric_key="loss"),
            RecordWrapping(logdir),
        ],
        loggers={},
    )
    return runner


def _tag() -> str:
    return f"rank{os.environ['RANK']}" if "RANK" in os.environ else "main"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--engine", choices=sorted(ENGINES), default="device")
    parser.add_argument("--backend", default="aot_eager")
    parser.add_argument("--dict", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = _tag()
    batch_size = 8 if args.engine.startswith("ddp") else 16
    for kind in ("plain", "compiled"):
        net = make_model()
        if kind == "compiled":
            net = torch.compile(net, backend=args.backend)
        given = {"net": net} if args.dict else net
        runner = train(given, args.engine, batch_size, out / f"logs_{kind}")
        state = unwrap_module(net).state_dict()
        torch.save({k: v.clone() for k, v in state.items()}, out / f"weights_{kind}_{tag}.pt")
    after = runner.model["net"] if args.dict else runner.model
    info = {
        "type": type(after).__name__,
        "inner": type(getattr(after, "_orig_mod", after)).__name__,
        "is_given_object": after is net,
    }
    (out / f"model_{tag}.json").write_text(json.dumps(info))


if __name__ == "__main__":
    main()
