"""Optional rows: the same single-process workload through PyTorch Lightning (Trainer and
Fabric), Accelerate and Ignite, each only when importable (nothing here installs them).

Every framework runs bench_common's workload: same model, data and shuffle (Lightning's only in
the first epoch, see lightning_train), Adam, top-1 accuracy of every batch, a progress bar,
validation, CSV rows per epoch and last/best checkpoints, each through the framework's own API
where it offers one (Lightning: LightningModule + Trainer with CSVLogger and ModelCheckpoint;
Fabric: fabric.setup/backward/log_dict/save; Accelerate: Accelerator.prepare/backward/save_state;
Ignite: create_supervised_trainer, Accuracy, Checkpoint).
The progress bars keep each framework's default refresh (Lightning and Ignite redraw every
step, the hand-written loops at most every 0.5 s): that is what a user of it pays.

For every framework found: one warm-up of each kind, then rounds of plain, ddprun and the
framework in rotating order; median train time per step (the step-end intervals of
bench_single.py, taken with each framework's own per-batch hook), CPU time per step, and the
median of the per-round ratios to the plain loop.

    python benchmarks/bench_frameworks.py [--quick] [--reps N] [--models tiny,mlp]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bench_common as bc
import torch
from torch import nn

# framework name -> the module names it may be installed as (first found wins)
FRAMEWORKS = {
    "lightning": ("lightning", "pytorch_lightning"),
    "fabric": ("lightning.fabric", "lightning_fabric"),
    "accelerate": ("accelerate",),
    "ignite": ("ignite",),
}


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a dotted name whose parent package is missing
        return False


def available() -> dict[str, str]:
    found = {}
    for name, modules in FRAMEWORKS.items():
        for module in modules:
            if _importable(module):
                found[name] = module
                break
    return found


# --------------------------------------------------------------------- Lightning
def lightning_train(work: bc.Workload, model_name: str, logdir: Path, module: str) -> bc.RunResult:
    """LightningModule + Trainer: CSVLogger, ModelCheckpoint (last and best), TQDM bar.

    The shuffle differs from the plain loop's from the second epoch on (same work per step):
    Lightning ends an epoch by the loader's length without exhausting its iterator, so
    RandomSampler skips a trailing draw from the shared generator that the other loops make."""
    clock = bc.StepClock()
    pl = importlib.import_module("lightning.pytorch" if module == "lightning" else module)
    loggers = importlib.import_module(f"{pl.__name__}.loggers")
    callbacks = importlib.import_module(f"{pl.__name__}.callbacks")

    class Lit(pl.LightningModule):
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
            # on_step for the bar, on_epoch for the CSV row (a mean weighted by batch size)
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
        """Step ends from on_train_batch_end. Lightning runs user callbacks before the bar
        and the logger connector, so the probe sits mid-step, not at its end; every interval
        between two step ends still holds exactly one step's work."""

        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            clock.start()

        def on_train_batch_end(
            self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            clock.end(batch_idx + 1 == trainer.num_training_batches)

        def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            clock.stop()  # validation runs inside the train epoch, before its end hook

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            clock.stop()

    loaders = bc.make_loaders(work, bc.make_data(work))
    trainer = pl.Trainer(
        max_epochs=work.epochs,
        accelerator="cpu",
        devices=1,
        logger=loggers.CSVLogger(str(logdir)),
        # the plain loop writes CSV rows per epoch: one step row per epoch, not one per 50 steps
        log_every_n_steps=work.train_steps_per_epoch,
        callbacks=[
            Probe(),
            # tqdm like the other loops (Lightning picks Rich instead when it is installed)
            callbacks.TQDMProgressBar(),
            callbacks.ModelCheckpoint(
                dirpath=str(logdir / "checkpoints"),
                monitor="valid_loss",
                mode="min",
                save_top_k=1,
                save_last=True,
            ),
        ],
        enable_progress_bar=True,
        enable_model_summary=False,
        num_sanity_val_steps=0,  # the plain loop runs no sanity validation
        default_root_dir=str(logdir),
    )
    trainer.fit(Lit(), loaders["train"], loaders["valid"])
    metrics = trainer.callback_metrics
    return clock.result(float(metrics["valid_loss"]), float(metrics["valid_accuracy01"]))


# ------------------------------------------------------------------------ Fabric
def fabric_train(work: bc.Workload, model_name: str, logdir: Path, module: str) -> bc.RunResult:
    """The plain loop through Fabric: setup, setup_dataloaders, backward, log_dict, save."""
    clock = bc.StepClock()
    fabric_module = importlib.import_module(module)
    loggers = importlib.import_module(f"{module}.loggers")

    # flush every row: the plain loop writes its CSV row at the end of each epoch
    logger = loggers.CSVLogger(str(logdir), name="logs", flush_logs_every_n_steps=1)
    fabric = fabric_module.Fabric(accelerator="cpu", devices=1, loggers=logger)
    fabric.launch()
    torch.manual_seed(work.seed)
    model = bc.make_model(model_name, work.features, work.classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=work.lr)
    model, optimizer = fabric.setup(model, optimizer)
    loaders = bc.make_loaders(work, bc.make_data(work))
    train, valid = fabric.setup_dataloaders(loaders["train"], loaders["valid"])
    best = float("inf")
    metrics: dict[str, float] = {}
    for epoch in range(1, work.epochs + 1):
        row: dict[str, float] = {}
        for key, loader in (("train", train), ("valid", valid)):
            sums = bc.loader_pass(
                work,
                epoch,
                key,
                loader,
                model,
                optimizer,
                fabric.backward,
                clock,
                show=fabric.is_global_zero,
            )
            metrics = bc.means(fabric.all_reduce(sums, reduce_op="sum"))
            row.update({f"{key}_{name}": value for name, value in metrics.items()})
        fabric.log_dict(row, step=epoch)
        state = {"model": model, "optimizer": optimizer, "epoch": epoch, "metrics": metrics}
        fabric.save(logdir / "checkpoints" / "last.ckpt", state)
        if metrics["loss"] < best:
            best = metrics["loss"]
            fabric.save(logdir / "checkpoints" / "best.ckpt", state)
    return clock.result(metrics["loss"], metrics["accuracy01"])


# -------------------------------------------------------------------- Accelerate
def accelerate_train(work: bc.Workload, model_name: str, logdir: Path, module: str) -> bc.RunResult:
    """The plain loop through Accelerator.prepare / backward / reduce / save_state; the CSV rows
    by hand, as Accelerate's trackers offer no CSV writer."""
    from accelerate import Accelerator

    clock = bc.StepClock()
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(work.seed)
    model = bc.make_model(model_name, work.features, work.classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=work.lr)
    loaders = bc.make_loaders(work, bc.make_data(work))
    model, optimizer, train, valid = accelerator.prepare(
        model, optimizer, loaders["train"], loaders["valid"]
    )
    (logdir / "logs").mkdir(parents=True, exist_ok=True)
    best = float("inf")
    metrics: dict[str, float] = {}
    for epoch in range(1, work.epochs + 1):
        for key, loader in (("train", train), ("valid", valid)):
            sums = bc.loader_pass(
                work,
                epoch,
                key,
                loader,
                model,
                optimizer,
                accelerator.backward,
                clock,
                show=accelerator.is_local_main_process,
            )
            metrics = bc.means(accelerator.reduce(sums, reduction="sum"))
            if accelerator.is_main_process:
                bc._append_csv(logdir / "logs" / f"{key}.csv", epoch, metrics)
        accelerator.save_state(str(logdir / "checkpoints" / "last"))
        if metrics["loss"] < best:
            best = metrics["loss"]
            accelerator.save_state(str(logdir / "checkpoints" / "best"))
    return clock.result(metrics["loss"], metrics["accuracy01"])


# ------------------------------------------------------------------------ Ignite
def ignite_train(work: bc.Workload, model_name: str, logdir: Path, module: str) -> bc.RunResult:
    """create_supervised_trainer/_evaluator, Accuracy and Average metrics, ProgressBar,
    Checkpoint (last and best); the CSV rows by hand, as Ignite ships no CSV logger."""
    from ignite.engine import Events, create_supervised_evaluator, create_supervised_trainer
    from ignite.handlers import Checkpoint, DiskSaver, global_step_from_engine
    from ignite.metrics import Accuracy, Average, Loss

    try:
        from ignite.handlers import ProgressBar
    except ImportError:  # older ignite
        from ignite.contrib.handlers import ProgressBar

    clock = bc.StepClock()
    torch.manual_seed(work.seed)
    model = bc.make_model(model_name, work.features, work.classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=work.lr)
    criterion = nn.CrossEntropyLoss()
    loaders = bc.make_loaders(work, bc.make_data(work))
    steps = len(loaders["train"])
    (logdir / "logs").mkdir(parents=True, exist_ok=True)

    # the default output is loss.item(); keep tensors so the metrics need no host read
    trainer = create_supervised_trainer(
        model, optimizer, criterion, output_transform=lambda x, y, y_pred, loss: (y_pred, y, loss)
    )
    Accuracy(output_transform=lambda out: out[:2]).attach(trainer, "accuracy01")
    Average(output_transform=lambda out: out[2].detach()).attach(trainer, "loss")
    ProgressBar(persist=True).attach(trainer, output_transform=lambda out: {"loss": out[2]})
    evaluator = create_supervised_evaluator(
        model, metrics={"accuracy01": Accuracy(), "loss": Loss(criterion)}
    )
    ProgressBar(persist=True).attach(evaluator)

    saver = DiskSaver(str(logdir / "checkpoints"), require_empty=False)
    to_save = {"model": model, "optimizer": optimizer, "trainer": trainer}
    best = Checkpoint(
        to_save,
        saver,
        filename_prefix="best",
        n_saved=1,
        score_function=Checkpoint.get_default_score_fn("loss", -1.0),  # lowest loss
        score_name="neg_loss",
        global_step_transform=global_step_from_engine(trainer),
    )
    evaluator.add_event_handler(Events.COMPLETED, best)

    # attached after the metrics and the bar, so the clock sees the whole step
    @trainer.on(Events.EPOCH_STARTED)
    def _start(engine: Any) -> None:
        clock.start()

    @trainer.on(Events.ITERATION_COMPLETED)
    def _end(engine: Any) -> None:
        clock.end(engine.state.iteration % steps == 0)

    @trainer.on(Events.EPOCH_COMPLETED)
    def _validate(engine: Any) -> None:
        clock.stop()
        epoch = engine.state.epoch
        bc._append_csv(logdir / "logs" / "train.csv", epoch, dict(engine.state.metrics))
        evaluator.run(loaders["valid"])
        bc._append_csv(logdir / "logs" / "valid.csv", epoch, dict(evaluator.state.metrics))

    trainer.add_event_handler(
        Events.EPOCH_COMPLETED, Checkpoint(to_save, saver, filename_prefix="last", n_saved=1)
    )
    trainer.run(loaders["train"], max_epochs=work.epochs)
    metrics = evaluator.state.metrics
    return clock.result(float(metrics["loss"]), float(metrics["accuracy01"]))


RUNNERS: dict[str, Callable[[bc.Workload, str, Path, str], bc.RunResult]] = {
    "lightning": lightning_train,
    "fabric": fabric_train,
    "accelerate": accelerate_train,
    "ignite": ignite_train,
}


def measure(work: bc.Workload, model: str, name: str, module: str, reps: int) -> dict[str, Any]:
    def one(kind: str, run_work: bc.Workload = work) -> bc.RunResult:
        with bc.temp_logdir(f"{kind}-{model}") as logdir, bc.quiet():
            if kind == "plain":
                result = bc.plain_train(run_work, model, logdir)
            elif kind == "ddprun":
                result = bc.ddprun_train(run_work, model, logdir)
            else:
                result = RUNNERS[name](run_work, model, Path(logdir), module)
        if torch.get_num_threads() != 1:  # a framework must not change the compared setup
            raise RuntimeError(f"{kind} left torch at {torch.get_num_threads()} threads")
        return result

    # warm-up of every kind on a short run (imports, first-use costs), as bench_single.py
    warm = bc.replace(work, epochs=1, train_samples=min(work.train_samples, 2048))
    runs: dict[str, list[bc.RunResult]] = {"plain": [], "ddprun": [], "framework": []}
    kinds = list(runs)
    for kind in kinds:
        one(kind, warm)
    for rep in range(reps):
        # rotate the order, so that no kind always follows another
        for kind in kinds[rep % 3 :] + kinds[: rep % 3]:
            runs[kind].append(one(kind))
    plain, ours, theirs = runs["plain"], runs["ddprun"], runs["framework"]

    def ratios(field: str, side: list[bc.RunResult]) -> list[float]:
        return [getattr(s, field) / getattr(p, field) for s, p in zip(side, plain)]

    ratio = ratios("step_median_s", theirs)
    step = {kind: bc.median([r.step_median_s for r in side]) for kind, side in runs.items()}
    bc.log(
        f"  {name}/{model}: median step plain {bc.fmt_time(step['plain'])}, "
        f"ddprun {bc.fmt_time(step['ddprun'])}, {name} {bc.fmt_time(step['framework'])}"
    )
    return {
        "section": "frameworks",
        "framework": f"{name} ({module})",
        "model": model,
        "reps": reps,
        "steps": theirs[0].steps,
        "plain_step_s": step["plain"],
        "ddprun_step_s": step["ddprun"],
        "framework_step_s": step["framework"],
        "ratio": bc.median(ratio),
        "ratio_min": min(ratio),
        "ratio_max": max(ratio),
        "ddprun_ratio": bc.median(ratios("step_median_s", ours)),
        "plain_cpu_step_s": bc.median([r.cpu_step_s for r in plain]),
        "framework_cpu_step_s": bc.median([r.cpu_step_s for r in theirs]),
        "cpu_ratio": bc.median(ratios("cpu_step_s", theirs)),
        "ddprun_cpu_ratio": bc.median(ratios("cpu_step_s", ours)),
        "plain_wall_s": bc.median([r.wall_s for r in plain]),
        "framework_wall_s": bc.median([r.wall_s for r in theirs]),
        "wall_ratio": bc.median(ratios("wall_s", theirs)),
        # same seed, data and model: the accuracies agree (Lightning's only for one epoch, as
        # its shuffle departs from the second on: see lightning_train)
        "plain_valid_accuracy": plain[-1].valid_accuracy,
        "ddprun_valid_accuracy": ours[-1].valid_accuracy,
        "framework_valid_accuracy": theirs[-1].valid_accuracy,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1 epoch of 4096 samples, 2 reps")
    parser.add_argument("--reps", type=int, default=None, help="rounds (default 3)")
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
            start = time.perf_counter()
            try:
                result = measure(work, model, name, module, reps)
            except Exception as error:  # one broken framework must not hide the others
                bc.log(traceback.format_exc())
                bc.emit({"section": "frameworks", "skipped": f"{name} failed: {error!r}"})
                continue
            result["workload"] = work.as_dict()
            result["seconds"] = time.perf_counter() - start
            bc.emit(result)


if __name__ == "__main__":
    main()
