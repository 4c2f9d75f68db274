"""A criterion with trainable parameters (a learnable temperature and a head inside the loss).

    python learned_loss.py --out DIR --batch-size 16                     (one process)
    ddprun --nproc 2 learned_loss.py --out DIR --ddp --batch-size 8      (launched)

Add ``--logdir L --epochs N [--resume L/checkpoints/last.pth]`` to checkpoint and resume.
Training is unshuffled, so 2 ranks x batch 8 see the same samples per step as 1 x batch 16.
Every rank writes its final model and criterion states.
"""

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ddprun import dl


class LearnedLoss(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.log_temperature = nn.Parameter(torch.zeros(()))
        self.head = nn.Linear(3, 3)

    def forward(self, logits, targets):
        return F.cross_entropy(self.head(logits) * self.log_temperature.exp(), targets)


class Dump(dl.Callback):
    def __init__(self, out: Path):
        super().__init__(order=dl.CallbackOrder.ExternalExtra)
        self.out = out

    def on_experiment_end(self, runner):
        rank = max(runner.engine.rank, 0)
        states = {
            "model": runner.engine.unwrap(runner.model).state_dict(),
            "criterion": runner.engine.unwrap(runner.criterion).state_dict(),
        }
        plain = {part: {k: v.tolist() for k, v in s.items()} for part, s in states.items()}
        (self.out / f"states_rank{rank}.json").write_text(json.dumps(plain))


class LossRunner(dl.Runner):
    def handle_batch(self, batch):
        x, y = batch
        self.batch = {"features": x, "targets": y, "logits": self.model(x)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--ddp", action="store_true")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--logdir", default=None)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--accumulate", type=int, default=1)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    x = torch.randn(128, 5)
    y = (x[:, :3].argmax(dim=1)).long()
    model, criterion = nn.Linear(5, 3), LearnedLoss()
    params = [*model.parameters(), *criterion.parameters()]
    LossRunner().train(
        model=model,
        criterion=criterion,
        optimizer=torch.optim.SGD(params, lr=0.5),
        loaders={"train": DataLoader(TensorDataset(x, y), batch_size=args.batch_size)},
        engine=dl.DistributedDataParallelEngine() if args.ddp else dl.DeviceEngine("cpu"),
        callbacks=[
            dl.CriterionCallback(input_key="logits", target_key="targets", metric_key="loss"),
            dl.OptimizerCallback(metric_key="loss", accumulation_steps=args.accumulate),
            Dump(out),
        ],
        loggers={},
        num_epochs=args.epochs,
        logdir=args.logdir,
        valid_loader="train",
        resume=args.resume,
    )


if __name__ == "__main__":
    main()
