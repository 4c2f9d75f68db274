"""The event loop: nesting, exceptions, callback order and node filtering (API.md sections 2, 5)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ddprun import dl
from ddprun.core.callback import Event, build_dispatch, keep_for_rank
from tests.runner.helpers import Recorder, engine, linear, loader

STAGES = ["stage_a", "stage_b"]
LOADERS = ["train", "valid"]


class TwoStageRunner(dl.IRunner):
    """2 stages x 2 epochs x 2 loaders (2 batches each); callbacks from `make_callbacks`."""

    def __init__(self, make_callbacks, fail_at: tuple[str, int, str, int] | None = None) -> None:
        super().__init__()
        self.make_callbacks = make_callbacks
        self.fail_at = fail_at

    @property
    def stages(self) -> list[str]:
        return STAGES

    def get_stage_len(self, stage: str) -> int:
        return 2

    def get_engine(self) -> Any:
        return engine()

    def get_loggers(self) -> dict:
        return {}

    def get_loaders(self, stage: str) -> dict:
        return {key: loader(8, 4, seed=i) for i, key in enumerate(LOADERS)}

    def get_model(self, stage: str) -> Any:
        return linear()

    def get_callbacks(self, stage: str) -> Any:
        return self.make_callbacks(stage)

    def handle_batch(self, batch: Any) -> None:
        where = (self.stage_key, self.stage_epoch_step, self.loader_key, self.loader_batch_step)
        if where == self.fail_at:
            raise ValueError("boom in handle_batch")
        features, targets = batch
        self.batch = {"logits": self.model(features), "targets": targets}


def where(event: str, runner: Any) -> tuple:
    return (runner.stage_key, runner.stage_epoch_step, runner.loader_key)


def expected_nesting() -> list[tuple[str, tuple]]:
    events: list[tuple[str, Any]] = []
    for stage in STAGES:
        events.append(("on_stage_start", (stage, 0)))
        for epoch in (1, 2):
            events.append(("on_epoch_start", (stage, epoch)))
            for key in LOADERS:
                events.append(("on_loader_start", (stage, epoch, key)))
                events += [
                    ("on_batch_start", (stage, epoch, key)),
                    ("on_batch_end", (stage, epoch, key)),
                ] * 2
                events.append(("on_loader_end", (stage, epoch, key)))
            events.append(("on_epoch_end", (stage, epoch)))
        events.append(("on_stage_end", (stage, 2)))
    events.append(("on_experiment_end", ("stage_b", 2)))
    return events


def _shape(log: list) -> list[tuple[str, tuple]]:
    """(event, where) with the loader left out outside loaders, the epoch outside epochs."""
    shaped = []
    for _, event, (stage, epoch, key) in log:
        if event in ("on_stage_start", "on_stage_end", "on_epoch_start", "on_epoch_end"):
            shaped.append((event, (stage, epoch)))
        elif event in ("on_experiment_start", "on_experiment_end", "on_exception"):
            shaped.append((event, (stage, epoch)))
        else:
            shaped.append((event, (stage, epoch, key)))
    return shaped


def test_events_nest_stage_epoch_loader_batch_for_two_stages():
    log: list = []
    recorder = Recorder(log, snapshot=where)
    TwoStageRunner(lambda stage: {"rec": recorder}).run()
    shaped = [entry for entry in _shape(log) if entry[0] != "on_experiment_start"]
    assert shaped == expected_nesting()
    assert not any(event == "on_exception" for _, event, _ in log)


def test_callbacks_receive_experiment_start_once_before_stage_start():
    log: list = []
    recorder = Recorder(log, snapshot=where)
    TwoStageRunner(lambda stage: {"rec": recorder}).run()
    events = [event for _, event, _ in log]
    assert events.count("on_experiment_start") == 1
    assert events[0] == "on_experiment_start"
    assert events[1] == "on_stage_start"


def test_exception_in_handle_batch_reaches_callbacks_and_reraises():
    log: list = []
    recorder = Recorder(log, snapshot=where)
    runner = TwoStageRunner(lambda stage: {"rec": recorder}, fail_at=("stage_b", 1, "valid", 2))
    with pytest.raises(ValueError, match="boom in handle_batch"):
        runner.run()
    events = [event for _, event, _ in log]
    assert events.count("on_exception") == 1
    assert events[-1] == "on_exception"
    # the failing batch started but never ended, and nothing after it ran
    assert events[-2] == "on_batch_start"
    assert log[-2][2] == ("stage_b", 1, "valid")
    last_stage_start = len(events) - 1 - events[::-1].index("on_stage_start")
    assert events.count("on_stage_start") == 2 and events.count("on_stage_end") == 1
    assert "on_stage_end" not in events[last_stage_start:]
    assert isinstance(runner.exception, ValueError)


def test_callback_may_swallow_the_exception():
    class Swallow(dl.Callback):
        def __init__(self) -> None:
            super().__init__(order=dl.CallbackOrder.External)
            self.seen: list[BaseException] = []

        def on_exception(self, runner: Any) -> None:
            self.seen.append(runner.exception)
            runner.need_exception_reraise = False

    swallow = Swallow()
    runner = TwoStageRunner(lambda stage: {"s": swallow}, fail_at=("stage_a", 2, "train", 1))
    assert runner.run() is runner
    assert len(swallow.seen) == 1 and "boom" in str(swallow.seen[0])
    assert runner.stage_key == "stage_a" and runner.stage_epoch_step == 2


def test_callbacks_sorted_by_order_then_insertion():
    log: list = []
    order = dl.CallbackOrder

    def make(stage: str) -> dict:
        return {
            "ext_1": Recorder(log, "ext_1", order.External),
            "metric": Recorder(log, "metric", order.Metric),
            "ext_2": Recorder(log, "ext_2", order.External),
            "internal": Recorder(log, "internal", order.Internal),
            "sched": Recorder(log, "sched", order.Scheduler),
            "ext_3": Recorder(log, "ext_3", order.External),
        }

    runner = TwoStageRunner(make)
    runner.run()
    expected = ["internal", "metric", "sched", "ext_1", "ext_2", "ext_3"]
    assert list(runner.callbacks) == expected
    first_batch_end = [name for name, event, _ in log if event == "on_batch_end"][:6]
    assert first_batch_end == expected


def test_callback_list_gets_index_keys_and_is_sorted():
    log: list = []

    def make(stage: str) -> list:
        return [Recorder(log, "late", dl.CallbackOrder.External), Recorder(log, "early", 0)]

    runner = TwoStageRunner(make)
    runner.run()
    assert list(runner.callbacks) == ["1", "0"]
    assert [n for n, e, _ in log if e == "on_stage_start"][:2] == ["early", "late"]


def test_master_and_worker_nodes_on_a_single_process():
    log: list = []

    def make(stage: str) -> dict:
        return {
            "all": Recorder(log, "all", node=dl.CallbackNode.all),
            "master": Recorder(log, "master", node=dl.CallbackNode.master),
            "worker": Recorder(log, "worker", node=dl.CallbackNode.worker),
        }

    runner = TwoStageRunner(make)
    runner.run()
    assert runner.engine.rank == -1 and runner.engine.is_master
    assert list(runner.callbacks) == ["all", "master"]
    names = {name for name, _, _ in log}
    assert names == {"all", "master"}
    assert sum(1 for n, e, _ in log if n == "master" and e == "on_batch_end") == 16


@pytest.mark.parametrize(
    ("node", "rank", "kept"),
    [
        (dl.CallbackNode.all, -1, True),
        (dl.CallbackNode.all, 3, True),
        (dl.CallbackNode.master, -1, True),
        (dl.CallbackNode.master, 0, True),
        (dl.CallbackNode.master, 1, False),
        (dl.CallbackNode.worker, -1, False),
        (dl.CallbackNode.worker, 0, False),
        (dl.CallbackNode.worker, 2, True),
    ],
)
def test_keep_for_rank(node, rank, kept):
    assert keep_for_rank(dl.Callback(order=0, node=node), rank) is kept


def test_start_events_see_bookkeeping_and_end_events_precede_it():
    """*_start: runner state is set before callbacks; at loader end the averages of
    batch_metrics are in loader_metrics before the callbacks run (a callback's value wins)."""
    seen: dict[str, Any] = {}

    class Probe(dl.Callback):
        def __init__(self) -> None:
            super().__init__(order=dl.CallbackOrder.Metric)

        def on_loader_start(self, runner: Any) -> None:
            seen.setdefault("loader_start", (runner.loader_key, dict(runner.loader_metrics)))

        def on_batch_end(self, runner: Any) -> None:
            runner.batch_metrics["m"] = 1.0

        def on_loader_end(self, runner: Any) -> None:
            seen.setdefault("loader_end_before", dict(runner.loader_metrics))
            if runner.loader_key == "valid":
                runner.loader_metrics["m"] = 7.0

        def on_epoch_end(self, runner: Any) -> None:
            seen.setdefault("epoch_end", {k: dict(v) for k, v in runner.epoch_metrics.items()})

    TwoStageRunner(lambda stage: {"p": Probe()}).run()
    assert seen["loader_start"] == ("train", {})
    assert seen["loader_end_before"] == {"m": 1.0}
    assert seen["epoch_end"] == {"train": {"m": 1.0}, "valid": {"m": 7.0}}


def test_non_callback_in_callbacks_is_a_type_error_naming_its_key():
    runner = TwoStageRunner(lambda stage: {"good": Recorder([]), "bad_one": torch.nn.Linear(1, 1)})
    with pytest.raises(TypeError, match="bad_one"):
        runner.run()


def test_stage_start_calls_the_factories_in_contract_order():
    calls: list[str] = []

    class Factories(TwoStageRunner):
        def get_loaders(self, stage: str) -> dict:
            calls.append("loaders")
            return super().get_loaders(stage)

        def get_model(self, stage: str) -> Any:
            calls.append("model")
            return super().get_model(stage)

        def get_criterion(self, stage: str) -> Any:
            calls.append("criterion")
            return torch.nn.MSELoss()

        def get_optimizer(self, stage: str, model: Any) -> Any:
            calls.append("optimizer")
            assert isinstance(model, torch.nn.Linear)
            return torch.optim.SGD(model.parameters(), lr=0.1)

        def get_scheduler(self, stage: str, optimizer: Any) -> Any:
            calls.append("scheduler")
            assert isinstance(optimizer, torch.optim.SGD)
            return None

        def get_callbacks(self, stage: str) -> Any:
            calls.append("callbacks")
            return {}

    runner = Factories(lambda stage: {})
    runner.run()
    per_stage = ["loaders", "model", "criterion", "optimizer", "scheduler", "callbacks"]
    assert calls == per_stage * 2
    assert isinstance(runner.criterion, torch.nn.MSELoss)


class IdleAtBatchStart(dl.Callback):
    """Overrides on_batch_start but says, through `handles`, that it has nothing to do there."""

    def __init__(self) -> None:
        super().__init__(order=0)
        self.calls = {"on_batch_start": 0, "on_batch_end": 0}

    def handles(self, event: Event) -> bool:
        return event is not Event.BATCH_START and super().handles(event)

    def on_batch_start(self, runner: Any) -> None:
        self.calls["on_batch_start"] += 1

    def on_batch_end(self, runner: Any) -> None:
        self.calls["on_batch_end"] += 1


def test_handles_keeps_an_idle_method_out_of_the_dispatch():
    idle = IdleAtBatchStart()
    model = linear()
    dl.SupervisedRunner().train(
        model=model,
        loaders={"train": loader(16, 4)},
        criterion=torch.nn.MSELoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        callbacks=[idle],
        engine=engine(),
        loggers={},
    )
    assert idle.calls == {"on_batch_start": 0, "on_batch_end": 4}
    dispatch = build_dispatch(
        {"one": dl.OptimizerCallback(), "two": dl.OptimizerCallback(accumulation_steps=2)}
    )
    assert [cb.accumulation_steps for cb in dispatch[Event.BATCH_START]] == [2]
    assert len(dispatch[Event.BATCH_END]) == 2
