"""A custom Runner on Digits: your own train/valid step, metrics and manual optimizer steps.

Run:  python examples/custom_runner.py [--logdir ./logs/custom] [--epochs 5]
"""

import torch

from _digits import digits_loaders, parse_args
from ddprun import dl, metrics, utils


class CustomRunner(dl.Runner):
    def predict_batch(self, batch):
        return self.model(batch[0].to(self.device).view(batch[0].size(0), -1))

    def handle_batch(self, batch):
        x, y = batch
        y_hat = self.model(x.view(x.size(0), -1))
        loss = self.criterion(y_hat, y)
        accuracy01, accuracy03 = metrics.accuracy(y_hat, y, topk=(1, 3))
        self.batch_metrics.update(
            {"loss": loss, "accuracy01": accuracy01, "accuracy03": accuracy03}
        )
        if self.is_train_loader:
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad()


if __name__ == "__main__":
    args = parse_args(__doc__, "./logs/custom")
    utils.set_global_seed(0)  # the same initial weights in every run and every process
    model = torch.nn.Linear(64, 10)
    runner = CustomRunner()
    runner.train(
        model=model,
        criterion=torch.nn.CrossEntropyLoss(),
        optimizer=torch.optim.Adam(model.parameters(), lr=0.02),
        loaders=digits_loaders(args.batch_size),
        logdir=args.logdir,
        num_epochs=args.epochs,
        load_best_on_end=True,
    )
    predictions = torch.cat(list(runner.predict_loader(loader=digits_loaders()["valid"])))
    print(
        f"predicted {len(predictions)} validation samples; logits shape {tuple(predictions.shape)}"
    )
