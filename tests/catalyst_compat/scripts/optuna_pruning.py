"""Catalyst 21.12's Optuna pattern (docs, FAQ "Optuna integration") with only the imports
renamed: three trials of a tiny SupervisedRunner, the second with a learning rate of 0, under a
MedianPruner; the objective returns ``trial.best_score``.

    python optuna_pruning.py --out DIR
    ddprun --nproc 2 optuna_pruning.py --out DIR --batch-size 16
    python optuna_pruning.py --out DIR --spawn      # DDP spawn mode: refused, with a reason

The trials are enqueued, so every rank trains the same hyper-parameters. Under the launcher
every rank runs its own in-memory study; rank 0's trial is reported to, rank 1's is not. Each
rank writes, per trial, its state, its reported values and the epoch its run ended at.
"""

import argparse
import json
from pathlib import Path

import optuna
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ddprun import dl


def loaders(batch_size: int):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(320, 10, generator=generator)
    y = (x[:, :5].argmax(dim=1)).long()
    train, valid = TensorDataset(x[:256], y[:256]), TensorDataset(x[256:], y[256:])
    return {
        "train": DataLoader(train, batch_size=batch_size),
        "valid": DataLoader(valid, batch_size=batch_size),
    }


SEEN = {"ended": {}, "losses": {}, "engines": {}}


class Record(dl.Callback):
    """What this process saw of each trial (in spawn mode that is the workers, not here)."""

    def __init__(self, number):
        super().__init__(order=dl.CallbackOrder.Internal)
        self.number = number

    def on_epoch_end(self, runner):
        SEEN["ended"][self.number] = runner.stage_epoch_step
        valid_loss = runner.epoch_metrics["valid"]["loss"]
        SEEN["losses"].setdefault(self.number, []).append(valid_loss)
        SEEN["engines"][self.number] = (type(runner.engine).__name__, runner.engine.rank)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--spawn", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ended, losses, engines = SEEN["ended"], SEEN["losses"], SEEN["engines"]

    def objective(trial):
        lr = trial.suggest_float("lr", 0.0, 0.1)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 5))
        runner = dl.SupervisedRunner(input_key="features", output_key="logits")
        engine = dl.DistributedDataParallelEngine(world_size=2) if args.spawn else None
        runner.train(
            engine=engine,
            model=model,
            criterion=nn.CrossEntropyLoss(),
            optimizer=torch.optim.SGD(model.parameters(), lr=lr),
            loaders=loaders(args.batch_size),
            callbacks={
                "optuna": dl.OptunaPruningCallback(
                    loader_key="valid", metric_key="loss", minimize=True, trial=trial
                ),
                "record": Record(trial.number),
            },
            num_epochs=3,
            loggers={},
        )
        return trial.best_score

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="minimize",
        pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0),
    )
    for lr in (0.05, 0.0, 0.1):
        study.enqueue_trial({"lr": lr})
    error = None
    try:
        study.optimize(objective, n_trials=3)
    except Exception as exc:  # spawn mode: the refusal, reported by the parent
        error = str(exc)
    rank = next(iter(engines.values()), ("", 0))[1]
    result = {
        "error": error,
        "engines": engines,
        "ended_at_epoch": ended,
        "valid_losses": losses,
        "trials": [
            {
                "state": trial.state.name,
                "value": trial.value,
                "intermediate": {str(k): v for k, v in trial.intermediate_values.items()},
            }
            for trial in study.trials
        ],
    }
    (out / f"rank{max(rank, 0)}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
