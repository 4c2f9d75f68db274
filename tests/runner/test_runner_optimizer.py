"""OptimizerCallback (accumulation, clipping, dict optimizers) and dict components (API.md 3, 5)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from ddprun import dl
from tests.runner.helpers import (
    SupervisedRunner,
    assert_same_state,
    engine,
    linear,
    loader,
    state_of,
)

NUM_BATCHES = 10  # 40 samples, batch 4


def train_loaders() -> dict:
    return {"train": loader(40, 4), "valid": loader(12, 4, seed=1)}


def run_callback(model: nn.Module, optimizer, epochs: int = 2, **callback_kwargs: Any) -> None:
    SupervisedRunner().train(
        model=model,
        loaders=train_loaders(),
        criterion=nn.MSELoss(),
        optimizer=optimizer,
        callbacks={
            "criterion": dl.CriterionCallback("logits", "targets"),
            "optimizer": dl.OptimizerCallback(**callback_kwargs),
        },
        engine=engine(),
        loggers={},
        num_epochs=epochs,
    )


def manual(model: nn.Module, optimizer, epochs: int = 2, k: int = 1, clip=None) -> None:
    """The hand-written loop OptimizerCallback must reproduce."""
    data = loader(40, 4)
    for _ in range(epochs):
        for step, (features, targets) in enumerate(data, start=1):
            loss = nn.functional.mse_loss(model(features), targets)
            (loss / k if k > 1 else loss).backward()
            if step % k == 0 or step == len(data):
                if clip is not None:
                    clip(model.parameters())
                optimizer.step()
                optimizer.zero_grad()


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def test_plain_optimizer_callback_equals_manual_loop():
    model, reference = linear(), linear()
    run_callback(model, sgd(model))
    manual(reference, sgd(reference))
    assert_same_state(state_of(model), state_of(reference))


@pytest.mark.parametrize("k", [2, 3, 4])
def test_accumulation_equals_manual_loop(k):
    model, reference = linear(), linear()
    run_callback(model, sgd(model), accumulation_steps=k)
    manual(reference, sgd(reference), k=k)
    assert_same_state(state_of(model), state_of(reference))
    # and it is not the same as stepping every batch
    plain = linear()
    manual(plain, sgd(plain))
    assert not torch.equal(plain.weight, model.weight)


def test_accumulation_step_count_includes_the_last_batch():
    model = linear()
    optimizer = sgd(model)
    steps: list[int] = []
    optimizer.register_step_post_hook(lambda opt, args, kwargs: steps.append(1))
    run_callback(model, optimizer, epochs=2, accumulation_steps=3)
    # batches 3, 6, 9 and the last (10) per epoch
    assert len(steps) == 2 * 4


def test_clipping_only_on_step_batches_equals_manual_loop():
    model, reference = linear(), linear()
    run_callback(
        model,
        sgd(model),
        accumulation_steps=2,
        grad_clip_fn="clip_grad_norm_",
        grad_clip_params={"max_norm": 0.05},
    )
    manual(
        reference,
        sgd(reference),
        k=2,
        clip=lambda params: nn.utils.clip_grad_norm_(params, max_norm=0.05),
    )
    assert torch.allclose(model.weight, reference.weight, atol=1e-7, rtol=0)
    assert torch.allclose(model.bias, reference.bias, atol=1e-7, rtol=0)
    unclipped = linear()
    manual(unclipped, sgd(unclipped), k=2)
    assert not torch.allclose(unclipped.weight, model.weight, atol=1e-4)


def test_clipping_with_a_callable():
    model, reference = linear(), linear()
    run_callback(
        model,
        sgd(model),
        grad_clip_fn=nn.utils.clip_grad_value_,
        grad_clip_params={"clip_value": 0.01},
    )
    manual(reference, sgd(reference), clip=lambda p: nn.utils.clip_grad_value_(p, clip_value=0.01))
    assert_same_state(state_of(model), state_of(reference))


def test_unknown_clip_function_name_is_an_error():
    with pytest.raises(ValueError, match="clip_grad_nrm_"):
        dl.OptimizerCallback(grad_clip_fn="clip_grad_nrm_")


def test_accumulation_steps_below_one_is_an_error():
    with pytest.raises(ValueError, match="accumulation_steps"):
        dl.OptimizerCallback(accumulation_steps=0)


# ------------------------------------------------------------- dict components
class TwoPartRunner(dl.Runner):
    """model = {"encoder", "head"}; logits = head(encoder(x))."""

    def handle_batch(self, batch: Any) -> None:
        features, targets = batch
        hidden = self.model["encoder"](features)
        self.batch = {"targets": targets, "logits": self.model["head"](hidden)}


def two_part(seed: int = 0) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    return {"encoder": nn.Linear(4, 3), "head": nn.Linear(3, 1)}


def test_optimizer_key_steps_only_that_entry():
    model = two_part()
    before = {key: state_of(module) for key, module in model.items()}
    optimizer = {key: torch.optim.SGD(module.parameters(), lr=0.1) for key, module in model.items()}
    TwoPartRunner().train(
        model=model,
        loaders=train_loaders(),
        criterion=nn.MSELoss(),
        optimizer=optimizer,
        callbacks={
            "criterion": dl.CriterionCallback("logits", "targets"),
            "optimizer": dl.OptimizerCallback(optimizer_key="encoder"),
        },
        engine=engine(),
        loggers={},
        num_epochs=2,
    )
    assert_same_state(before["head"], state_of(model["head"]))
    assert not torch.equal(before["encoder"]["weight"], model["encoder"].weight)

    reference = two_part()
    opt = torch.optim.SGD(reference["encoder"].parameters(), lr=0.1)
    for _ in range(2):
        for features, targets in loader(40, 4):
            logits = reference["head"](reference["encoder"](features))
            nn.functional.mse_loss(logits, targets).backward()
            opt.step()
            opt.zero_grad()
    assert_same_state(state_of(reference["encoder"]), state_of(model["encoder"]))


def test_dict_model_dict_criterion_and_dict_optimizer():
    model = two_part()
    optimizer = {key: torch.optim.SGD(module.parameters(), lr=0.1) for key, module in model.items()}
    criterion = {"mse": nn.MSELoss(), "l1": nn.L1Loss()}
    runner = TwoPartRunner()
    runner.train(
        model=model,
        loaders=train_loaders(),
        criterion=criterion,
        optimizer=optimizer,
        callbacks={
            "mse": dl.CriterionCallback(
                "logits", "targets", metric_key="loss", criterion_key="mse"
            ),
            "l1": dl.CriterionCallback("logits", "targets", metric_key="l1", criterion_key="l1"),
            "optimizer": dl.OptimizerCallback(metric_key="loss"),
        },
        engine=engine(),
        loggers={},
        num_epochs=2,
    )
    reference = two_part()
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in reference.values()]
    for _ in range(2):
        for features, targets in loader(40, 4):
            logits = reference["head"](reference["encoder"](features))
            nn.functional.mse_loss(logits, targets).backward()
            for opt in opts:
                opt.step()
                opt.zero_grad()
    for key in model:
        assert_same_state(state_of(reference[key]), state_of(model[key]))
    features, targets = loader(12, 12, seed=1).dataset.tensors
    with torch.no_grad():
        logits = reference["head"](reference["encoder"](features))
    valid = runner.epoch_metrics["valid"]
    assert valid["loss"] == pytest.approx(nn.functional.mse_loss(logits, targets).item(), rel=1e-5)
    assert valid["l1"] == pytest.approx(nn.functional.l1_loss(logits, targets).item(), rel=1e-5)


def test_unknown_criterion_key_names_it_and_the_keys():
    with pytest.raises(KeyError, match=r"'huber'.*\['l1', 'mse'\]"):
        TwoPartRunner().train(
            model=two_part(),
            loaders=train_loaders(),
            criterion={"mse": nn.MSELoss(), "l1": nn.L1Loss()},
            callbacks=[dl.CriterionCallback("logits", "targets", criterion_key="huber")],
            engine=engine(),
            loggers={},
        )


def test_unknown_optimizer_key_names_it():
    model = two_part()
    optimizer = {key: torch.optim.SGD(m.parameters(), lr=0.1) for key, m in model.items()}
    with pytest.raises(KeyError, match="'decoder'"):
        TwoPartRunner().train(
            model=model,
            loaders=train_loaders(),
            criterion=nn.MSELoss(),
            optimizer=optimizer,
            callbacks=[
                dl.CriterionCallback("logits", "targets"),
                dl.OptimizerCallback(optimizer_key="decoder"),
            ],
            engine=engine(),
            loggers={},
        )


def test_dict_model_moves_to_device_and_switches_modes():
    modes: list = []

    class Probe(TwoPartRunner):
        def handle_batch(self, batch: Any) -> None:
            super().handle_batch(batch)
            modes.append((self.loader_key, {k: m.training for k, m in self.model.items()}))

    Probe().train(model=two_part(), loaders=train_loaders(), engine=engine(), loggers={})
    assert {(key, tuple(m.values())) for key, m in modes} == {
        ("train", (True, True)),
        ("valid", (False, False)),
    }
