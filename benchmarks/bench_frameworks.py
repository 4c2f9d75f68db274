"""Optional rows: the same single-process workload through PyTorch Lightning, Accelerate and
Ignite, each only when importable (nothing here installs them).

For every framework found: rounds of plain, ddprun and the framework in rotating order, median
train time per step (the same step-end intervals as bench_single.py, taken with each
framework's own per-batch hook) and ratios to the plain loop.

    python benchmarks/bench_frameworks.py [--quick] [--models tiny,mlp]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import time
import traceback
from pathlib import Path
from typing import Any

import bench_common as bc
import torch
from torch import nn

# framework name -> the module names it may be installed as (first found wins)
FRAMEWORKS = {
    "lightning": ("lightning", "pytorch_lightning"),
    "accelerate": ("accelerate",),
    "ignite": ("ignite",),
}


def available() -> dict[str, str]:
    found = {}
    for name, modules in FRAMEWORKS.items():
        for module in modules:
            if importlib.util.find_spec(module) is not None:
                found[name] = module
                break
    return found


def _steps(start: float, ends: list[float]) -> list[float]:
    return bc._intervals(start, ends)


# --------------------------------------------------------------------- Lightning
def lightning_train(work: bc.Workload, model_name: str, logdir: Path, module: str) -> list[float]:
    L = importlib.import_module(module)
    pl = importlib.import_module("lightning.pytorch" if module == "lightning" else module)
    loggers = importlib.import_module(f"{pl.__name__}.loggers")
    callbacks = importlib.import_module(f"{pl.__name__}.callbacks")

    class Lit(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(work.seed)
            self.net = bc.make_model(model_name, work.features, work.classes)
            self.criterion = nn.CrossEntropyLoss()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            logits = self.net(x)
            loss = self.criterion(logits, y)
            accuracy = logits.argmax(dim=1).eq(y).float().mean()
            self.log("loss", loss, on_step=True, on_epoch=True, prog_bar=True)
            self.log("accuracy01", accuracy, on_step=True, on_epoch=True, prog_bar=True)
            return loss

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            logits = self.net(x)
            self.log("valid_loss", self.criterion(logits, y), on_epoch=True)
            self.log("valid_accuracy01", logits.argmax(dim=1).eq(y).float().mean(), on_epoch=True)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=work.lr)

    class Probe(pl.Callback):
        def __init__(self) -> None:
            self.intervals: list[float] = []

        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            self.start, self.ends = time.perf_counter(), []

        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            self.ends.append(time.perf_counter())

        def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            self._collect()

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            self._collect()

        def _collect(self) -> None:
            if getattr(self, "ends", None):
                self.intervals += _steps(self.start, self.ends)
                self.ends = []

    probe = Probe()
    loaders = bc.make_loaders(work, bc.make_data(work))
    trainer = pl.Trainer(
        max_epochs=work.epochs,
        accelerator="cpu",
        devices=1,
        logger=loggers.CSVLogger(str(logdir)),
        callbacks=[
            probe,
            callbacks.ModelCheckpoint(dirpath=str(logdir / "ckpt"), monitor="valid_loss"),
        ],
        enable_progress_bar=True,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(logdir),
    )
    trainer.fit(Lit(), loaders["train"], loaders["valid"])
    return probe.intervals


# -------------------------------------------------------------------- Accelerate
def accelerate_train(work: bc.Workload, model_name: str, logdir: Path, module: str) -> list[float]:
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(work.seed)
    model = bc.make_model(model_name, work.features, work.classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=work.lr)
    loaders = bc.make_loaders(work, bc.make_data(work))
    model, optimizer, train, valid = accelerator.prepare(
        model, optimizer, loaders["train"], loaders["valid"]
    )
    criterion = nn.CrossEntropyLoss()
    intervals: list[float] = []
    for epoch in range(work.epochs):
        for key, loader in (("train", train), ("valid", valid)):
            training = key == "train"
            model.train(training)
            sums = torch.zeros(3, dtype=torch.float64)
            bar = tqdm(total=len(loader), desc=f"{epoch} ({key})", dynamic_ncols=True)
            ends: list[float] = []
            with torch.set_grad_enabled(training):
                start = time.perf_counter()
                for x, y in loader:
                    logits = model(x)
                    loss = criterion(logits, y)
                    if training:
                        accelerator.backward(loss)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                    with torch.no_grad():
                        correct = logits.argmax(dim=1).eq(y).sum()
                        sums[0] += loss.detach() * y.shape[0]
                        sums[1] += correct
                        sums[2] += y.shape[0]
                    bar.update(1)
                    ends.append(time.perf_counter())
            bar.close()
            if training:
                intervals += _steps(start, ends)
        accelerator.save(accelerator.unwrap_model(model).state_dict(), logdir / "last.pth")
    return intervals


# ------------------------------------------------------------------------ Ignite
def ignite_train(work: bc.Workload, model_name: str, logdir: Path, module: str) -> list[float]:
    from ignite.engine import Engine, Events, create_supervised_evaluator
    from ignite.metrics import Accuracy, Loss

    try:
        from ignite.handlers import ProgressBar
    except ImportError:  # older ignite
        from ignite.contrib.handlers import ProgressBar

    torch.manual_seed(work.seed)
    model = bc.make_model(model_name, work.features, work.classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=work.lr)
    criterion = nn.CrossEntropyLoss()
    loaders = bc.make_loaders(work, bc.make_data(work))

    def update(engine: Any, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        model.train()
        x, y = batch
        logits = model(x)
        loss = criterion(logits, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return logits.detach(), y

    trainer = Engine(update)
    Accuracy().attach(trainer, "accuracy01")
    evaluator = create_supervised_evaluator(
        model, metrics={"accuracy01": Accuracy(), "loss": Loss(criterion)}
    )
    ProgressBar().attach(trainer)
    state: dict[str, Any] = {"intervals": []}

    @trainer.on(Events.EPOCH_STARTED)
    def _start(engine: Any) -> None:
        state["start"], state["ends"] = time.perf_counter(), []

    @trainer.on(Events.ITERATION_COMPLETED)
    def _end(engine: Any) -> None:
        state["ends"].append(time.perf_counter())

    @trainer.on(Events.EPOCH_COMPLETED)
    def _validate(engine: Any) -> None:
        state["intervals"] += _steps(state["start"], state["ends"])
        evaluator.run(loaders["valid"])
        torch.save(model.state_dict(), logdir / "last.pth")

    trainer.run(loaders["train"], max_epochs=work.epochs)
    return state["intervals"]


RUNNERS = {"lightning": lightning_train, "accelerate": accelerate_train, "ignite": ignite_train}


def measure(work: bc.Workload, model: str, name: str, module: str, reps: int) -> dict[str, Any]:
    def one(kind: str) -> float:
        with bc.temp_logdir(f"{kind}-{model}") as logdir, bc.quiet():
            if kind == "plain":
                return bc.plain_train(work, model, logdir).step_median_s
            if kind == "ddprun":
                return bc.ddprun_train(work, model, logdir).step_median_s
            return bc.median(RUNNERS[name](work, model, Path(logdir), module))

    times: dict[str, list[float]] = {"plain": [], "ddprun": [], "framework": []}
    one("framework")  # warm-up (imports, first-use costs)
    kinds = list(times)
    for rep in range(reps):
        for kind in kinds[rep % 3 :] + kinds[: rep % 3]:
            times[kind].append(one(kind))
    ratio = [f / p for f, p in zip(times["framework"], times["plain"])]
    ours = [d / p for d, p in zip(times["ddprun"], times["plain"])]
    return {
        "section": "frameworks",
        "framework": f"{name} ({module})",
        "model": model,
        "reps": reps,
        "plain_step_s": bc.median(times["plain"]),
        "ddprun_step_s": bc.median(times["ddprun"]),
        "framework_step_s": bc.median(times["framework"]),
        "ratio": bc.median(ratio),
        "ddprun_ratio": bc.median(ours),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--models", default=",".join(bc.MODELS))
    args = parser.parse_args(argv)
    found = available()
    if not found:
        names = ", ".join(FRAMEWORKS)
        bc.log(f"skipped: none of {names} is importable")
        bc.emit({"section": "frameworks", "skipped": f"not installed ({names})"})
        return
    torch.set_num_threads(1)
    work = bc.Workload().quick() if args.quick else bc.Workload()
    reps = args.reps or (2 if args.quick else 3)
    for name, module in found.items():
        for model in args.models.split(","):
            try:
                bc.emit(measure(work, model, name, module, reps))
            except Exception as error:  # one broken framework must not hide the others
                bc.log(traceback.format_exc())
                bc.emit({"section": "frameworks", "skipped": f"{name} failed: {error!r}"})


if __name__ == "__main__":
    main()
