import os
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader
from ddprun.contrib.datasets import MNIST
from ddprun.data.transforms import ToTensor
from ddprun import dl, metrics

# <--- multi-model/optimizer setup --->
encoder = torch.nn.Linear(28 * 28, 128)
head = torch.nn.Linear(128, 10)
model = {"encoder": encoder, "head": head}
optimizer = {
    "encoder": torch.optim.Adam(encoder.parameters(), lr=0.02),
    "head": torch.optim.Adam(head.parameters(), lr=0.001),
}
# <--- multi-model/optimizer setup --->
criterion = torch.nn.CrossEntropyLoss()

loaders = {
    "train": DataLoader(MNIST(os.getcwd(), train=True, download=True, transform=ToTensor()), batch_size=32),
    "valid": DataLoader(MNIST(os.getcwd(), train=False, download=True, transform=ToTensor()), batch_size=32),
}

class CustomRunner(dl.Runner):

    def predict_batch(self, batch):
        # model inference step
        return self.model(batch[0].to(self.device).view(batch[0].size(0), -1))

    def _handle_batch(self, batch):
        # model train/valid step
        x, y = batch
        # <--- multi-model/optimizer usage --->
        x_ = self.model["encoder"](x.view(x.size(0), -1))
        y_hat = self.model["head"](x_)
        # <--- multi-model/optimizer usage --->

        loss = self.criterion(y_hat, y)
        accuracy01, accuracy03 = metrics.accuracy(y_hat, y, topk=(1, 3))
        self.batch_metrics.update(
            {"loss": loss, "accuracy01": accuracy01, "accuracy03": accuracy03}
        )

        if self.is_train_loader:
            loss.backward()
            # <--- multi-model/optimizer usage --->
            self.optimizer["encoder"].step()
            self.optimizer["head"].step()
            self.optimizer["encoder"].zero_grad()
            self.optimizer["head"].zero_grad()
            # <--- multi-model/optimizer usage --->

runner = CustomRunner()
# model training
runner.train(
    model=model,
    criterion=criterion,
    optimizer=optimizer,
    loaders=loaders,
    logdir="./logs",
    num_epochs=5,
    verbose=True,
    load_best_on_end=True,
)
