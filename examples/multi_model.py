"""Key-value models on Digits: an encoder and a head as a dict, one optimizer over both.

Run:  python examples/multi_model.py [--logdir ./logs/multi_model] [--epochs 5]
"""

import torch

from _digits import digits_loaders, parse_args
from ddprun import dl, utils


class MultiModelRunner(dl.Runner):
    def handle_batch(self, batch):
        x, y = batch
        features = self.model["encoder"](x.view(x.size(0), -1))
        self.batch = {"targets": y, "logits": self.model["head"](torch.relu(features))}


if __name__ == "__main__":
    args = parse_args(__doc__, "./logs/multi_model")
    utils.set_global_seed(0)  # the same initial weights in every run and every process
    model = {"encoder": torch.nn.Linear(64, 128), "head": torch.nn.Linear(128, 10)}
    optimizer = torch.optim.Adam(
        [{"params": model["encoder"].parameters()}, {"params": model["head"].parameters()}], lr=0.01
    )
    MultiModelRunner().train(
        model=model,
        criterion=torch.nn.CrossEntropyLoss(),
        optimizer=optimizer,
        loaders=digits_loaders(args.batch_size),
        callbacks=[
            dl.CriterionCallback(input_key="logits", target_key="targets"),
            dl.OptimizerCallback(metric_key="loss"),
            dl.AccuracyCallback(input_key="logits", target_key="targets", topk_args=(1, 3)),
        ],
        logdir=args.logdir,
        num_epochs=args.epochs,
        load_best_on_end=True,
    )
