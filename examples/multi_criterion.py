"""Key-value criteria on Digits: a multi-class and a multi-label loss, summed into one.

Run:  python examples/multi_criterion.py [--logdir ./logs/multi_criterion] [--epochs 5]
"""

import torch
from torch.nn import functional as F

from _digits import digits_loaders, parse_args
from ddprun import dl, utils


class MultiCriterionRunner(dl.Runner):
    def handle_batch(self, batch):
        x, y = batch
        logits = self.model(x.view(x.size(0), -1))
        self.batch = {"targets": y, "onehot": F.one_hot(y, 10).float(), "logits": logits}


class SumLosses(dl.Callback):
    """loss = loss_multiclass + loss_multilabel, after the criteria and before the optimizer."""

    def __init__(self):
        super().__init__(order=dl.CallbackOrder.MetricAggregation)

    def on_batch_end(self, runner):
        if not runner.is_infer_loader:
            metrics = runner.batch_metrics
            metrics["loss"] = metrics["loss_multiclass"] + metrics["loss_multilabel"]


if __name__ == "__main__":
    args = parse_args(__doc__, "./logs/multi_criterion")
    utils.set_global_seed(0)  # the same initial weights in every run and every process
    model = torch.nn.Linear(64, 10)
    criterion = {
        "multiclass": torch.nn.CrossEntropyLoss(),
        "multilabel": torch.nn.BCEWithLogitsLoss(),
    }
    MultiCriterionRunner().train(
        model=model,
        criterion=criterion,
        optimizer=torch.optim.Adam(model.parameters(), lr=0.02),
        loaders=digits_loaders(args.batch_size),
        callbacks=[
            dl.CriterionCallback(
                "logits", "targets", metric_key="loss_multiclass", criterion_key="multiclass"
            ),
            dl.CriterionCallback(
                "logits",
                "onehot",
                metric_key="loss_multilabel",
                criterion_key="multilabel",
            ),
            SumLosses(),
            dl.OptimizerCallback(metric_key="loss"),
            dl.AccuracyCallback(input_key="logits", target_key="targets", topk_args=(1, 3)),
        ],
        logdir=args.logdir,
        num_epochs=args.epochs,
        load_best_on_end=True,
    )
