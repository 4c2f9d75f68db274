"""Multistage finetuning on Digits: stage 1 trains the head on a frozen encoder, stage 2 tunes all.

Run:  python examples/finetune_multistage.py [--logdir ./logs/finetune] [--epochs 3]
The same script runs on N processes with ``ddprun --nproc 2 examples/finetune_multistage.py``
(the engine follows the launch; ``--ddp`` spawns two workers under plain python): weights move
between stages through the best checkpoint. ``--batch-size 16`` on 2 processes trains on the
same samples per step as the default 32 on one.
"""

import argparse

from torch import nn, optim
from torch.utils.data import DataLoader

from _digits import add_batch_size
from ddprun import dl, utils
from ddprun.contrib.datasets import Digits
from ddprun.data.transforms import ToTensor


class FinetuneRunner(dl.IRunner):
    def __init__(self, logdir: str, epochs: int, ddp: bool, batch_size: int = 32):
        super().__init__()
        self._logdir, self._epochs, self._ddp = logdir, epochs, ddp
        self._batch_size = batch_size

    def get_engine(self):
        # the default follows the launch: DDP under `ddprun --nproc N`, else one device
        return dl.DistributedDataParallelEngine() if self._ddp else super().get_engine()

    def get_loggers(self):
        return {
            "console": dl.ConsoleLogger(),
            "csv": dl.CSVLogger(logdir=self._logdir),
            "tensorboard": dl.TensorboardLogger(logdir=self._logdir),
        }

    @property
    def stages(self):
        return ["train_frozen", "train_unfrozen"]

    def get_stage_len(self, stage):
        return self._epochs

    def get_loaders(self, stage):
        return {
            "train": DataLoader(
                Digits(train=True, transform=ToTensor()),
                batch_size=self._batch_size,
                shuffle=True,
            ),
            "valid": DataLoader(Digits(train=False, transform=ToTensor()), batch_size=64),
        }

    def get_model(self, stage):
        # a fresh model each stage; its weights come from the best checkpoint (see callbacks)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        utils.set_requires_grad(model[1], stage != "train_frozen")
        return model

    def get_criterion(self, stage):
        return nn.CrossEntropyLoss()

    def get_optimizer(self, stage, model):
        params = [p for p in model.parameters() if p.requires_grad]
        return optim.Adam(params, lr=1e-2 if stage == "train_frozen" else 3e-3)

    def get_callbacks(self, stage):
        return {
            "criterion": dl.CriterionCallback(input_key="logits", target_key="targets"),
            "optimizer": dl.OptimizerCallback(metric_key="loss"),
            "accuracy": dl.AccuracyCallback(
                input_key="logits", target_key="targets", topk_args=(1, 3)
            ),
            "classification": dl.PrecisionRecallF1SupportCallback(
                input_key="logits", target_key="targets", num_classes=10
            ),
            "checkpoint": dl.CheckpointCallback(
                self._logdir,
                loader_key="valid",
                metric_key="loss",
                minimize=True,
                save_n_best=3,
                load_on_stage_start={"model": "best"},
            ),
        }

    def handle_batch(self, batch):
        features, targets = batch
        self.batch = {"features": features, "targets": targets, "logits": self.model(features)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--logdir", default="./logs/finetune")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--ddp", action="store_true", help="spawn DDP workers (plain python)")
    add_batch_size(parser)
    args = parser.parse_args()
    runner = FinetuneRunner(args.logdir, args.epochs, args.ddp, args.batch_size)
    runner.run()
    print(f"final valid accuracy: {runner.epoch_metrics['valid']['accuracy01']:.4f}")


if __name__ == "__main__":
    main()
