"""A run whose checkpoint writes take longer than the collective timeout (a slow filesystem).

    DDPRUN_COLLECTIVE_TIMEOUT=3 ddprun --nproc 2 slow_save.py --logdir DIR --delay 6

Rank 0's every checkpoint write sleeps `--delay` seconds first; the other ranks wait for it
at the checkpoint barrier, which has its own timeout (DDPRUN_CHECKPOINT_TIMEOUT).
With ``--sync-bn`` the DDP engine is asked for SyncBatchNorm (on a CPU: a clear error).
"""

import argparse
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

import ddprun.checkpoint as checkpoint_io
from ddprun import dl


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--logdir", required=True)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--sync-bn", action="store_true")
    args = parser.parse_args()
    plain_save = checkpoint_io.save_checkpoint

    def slow_save(obj, path):
        time.sleep(args.delay)
        return plain_save(obj, path)

    checkpoint_io.save_checkpoint = slow_save
    torch.manual_seed(0)
    x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2)
    )
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    _train(model, loader, args)


def _train(model, loader, args) -> None:
    class Plain(dl.Runner):
        def handle_batch(self, batch):
            x, y = batch
            self.batch = {"features": x, "targets": y, "logits": self.model(x)}

    Plain().train(
        model=model,
        criterion=torch.nn.CrossEntropyLoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loaders={"train": loader, "valid": loader},
        engine=dl.DistributedDataParallelEngine(sync_bn=args.sync_bn),
        callbacks=[
            dl.CriterionCallback(input_key="logits", target_key="targets", metric_key="loss"),
            dl.OptimizerCallback(metric_key="loss"),
        ],
        loggers={},
        num_epochs=2,
        logdir=args.logdir,
    )


if __name__ == "__main__":
    main()
