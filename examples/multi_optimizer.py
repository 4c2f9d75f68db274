"""Key-value optimizers on Digits: one optimizer per model part, each with its own lr.

Run:  python examples/multi_optimizer.py [--logdir ./logs/multi_optimizer] [--epochs 5]
"""

import torch

from _digits import digits_loaders, parse_args
from ddprun import dl, utils


class MultiOptimizerRunner(dl.Runner):
    def handle_batch(self, batch):
        x, y = batch
        features = torch.relu(self.model["encoder"](x.view(x.size(0), -1)))
        self.batch = {"targets": y, "logits": self.model["head"](features)}


if __name__ == "__main__":
    args = parse_args(__doc__, "./logs/multi_optimizer")
    utils.set_global_seed(0)  # the same initial weights in every run and every process
    model = {"encoder": torch.nn.Linear(64, 128), "head": torch.nn.Linear(128, 10)}
    optimizer = {
        "encoder": torch.optim.Adam(model["encoder"].parameters(), lr=0.01),
        "head": torch.optim.Adam(model["head"].parameters(), lr=0.003),
    }
    MultiOptimizerRunner().train(
        model=model,
        criterion=torch.nn.CrossEntropyLoss(),
        optimizer=optimizer,
        loaders=digits_loaders(args.batch_size),
        callbacks=[
            dl.CriterionCallback(input_key="logits", target_key="targets"),
            # without optimizer_key, one backward pass, then every optimizer of the dict steps
            dl.OptimizerCallback(metric_key="loss"),
            dl.AccuracyCallback(input_key="logits", target_key="targets", topk_args=(1, 3)),
        ],
        logdir=args.logdir,
        num_epochs=args.epochs,
        load_best_on_end=True,
    )
