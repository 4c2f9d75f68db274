"""Inference after and under DDP, and torch.compile under every engine (issue 10, items 8, 9).

Inference: predict_loader / evaluate_loader after a spawn-mode and after a launched DDP run equal
plain torch on the same weights; predict_loader(gather=True) hands rank 0 every prediction of an
odd-size loader once, in order. Compile: a compiled model trains like the uncompiled one under
DeviceEngine (inductor), AMPEngine, DDP (spawned) and DDP AMP (launched, dict model); DDP is
wrapped first and compiled outside; checkpoints carry no ``_orig_mod.`` and load both ways.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ddprun import dl
from ddprun.utils import load_checkpoint, unpack_checkpoint
from tests.workloads.helpers import SCRIPTS, ddprun, run, script

pytestmark = pytest.mark.timeout(300)


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"workload_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


infer = _load_script("infer_after_ddp")
compiled = _load_script("compile_train")


# ------------------------------------------------------------------------------- inference
def _reference(weights: dict) -> tuple[torch.Tensor, float]:
    """Plain torch, one process: logits of the inference set and its mean cross-entropy."""
    model = infer.make_model()
    model.load_state_dict(weights)
    model.eval()
    x, y = infer.infer_data()
    with torch.no_grad():
        logits = model(x)
    return logits, float(F.cross_entropy(logits, y))


def _cat(batches: list[dict]) -> tuple[list[int], torch.Tensor]:
    index = torch.cat([b["index"] for b in batches]).tolist()
    return index, torch.cat([b["logits"] for b in batches])


def _assert_all_in_order(batches: list[dict], expected: torch.Tensor, tol: float) -> None:
    index, logits = _cat(batches)
    assert index == list(range(infer.N_INFER))  # every sample once, in dataset order
    assert float((logits - expected).abs().max()) <= tol


def test_predict_and_evaluate_in_the_parent_after_a_spawn_mode_ddp_run(tmp_path):
    done = run(script("infer_after_ddp", "--out", str(tmp_path)), cwd=tmp_path, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    weights = torch.load(tmp_path / "weights_parent.pt")
    start = infer.make_model().state_dict()["0.weight"]
    assert float((weights["0.weight"] - start).abs().max()) > 1e-3  # it trained
    logits, loss = _reference(weights)
    _assert_all_in_order(torch.load(tmp_path / "predict_parent.pt"), logits, tol=1e-6)
    # gather=True in a process with no group: this process is rank 0 and predicts it all
    _assert_all_in_order(torch.load(tmp_path / "gathered_parent.pt"), logits, tol=1e-6)
    metrics = json.loads((tmp_path / "evaluate_parent.json").read_text())
    assert abs(metrics["loss"] - loss) <= 1e-6
    assert abs(metrics["ce"] - loss) <= 1e-6
    engine = json.loads((tmp_path / "engine_parent.json").read_text())
    assert engine == {"type": "DistributedDataParallelEngine", "is_master": True, "rank": -1}


def test_predict_gather_and_evaluate_on_every_rank_after_a_launched_ddp_run(tmp_path):
    done = run(ddprun(2, "infer_after_ddp", "--out", str(tmp_path)), cwd=tmp_path, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    weights = [torch.load(tmp_path / f"weights_rank{r}.pt") for r in (0, 1)]
    # the ranks' BatchNorm statistics differ after DDP training (their last local update), so
    # a gather that forgot to hand every rank rank 0's state would not match below
    assert float((weights[0]["1.running_mean"] - weights[1]["1.running_mean"]).abs().max()) > 1e-3
    rank0_logits, rank0_loss = _reference(weights[0])
    for rank in (0, 1):
        # gather=False: every rank predicts the whole loader with its own model
        own_logits, _ = _reference(weights[rank])
        _assert_all_in_order(torch.load(tmp_path / f"predict_rank{rank}.pt"), own_logits, 1e-6)
        # evaluate_loader: the group joined again, the loader split, exact metrics everywhere
        metrics = json.loads((tmp_path / f"evaluate_rank{rank}.json").read_text())
        assert abs(metrics["loss"] - rank0_loss) <= 1e-6
        assert abs(metrics["ce"] - rank0_loss) <= 1e-6
        engine = json.loads((tmp_path / f"engine_rank{rank}.json").read_text())
        assert engine == {
            "type": "DistributedDataParallelEngine",
            "is_master": rank == 0,
            "rank": rank,
        }
    gathered = torch.load(tmp_path / "gathered_rank0.pt")
    _assert_all_in_order(gathered, rank0_logits, tol=1e-5)
    # 37 samples: rank 0 predicted 19 (batches 4,4,4,4,3), rank 1 the other 18
    assert [len(b["index"]) for b in gathered] == [4, 4, 4, 4, 3, 4, 4, 4, 4, 2]
    assert torch.load(tmp_path / "gathered_rank1.pt") == []
    for rank in (0, 1):
        error = (tmp_path / f"gather_error_rank{rank}.txt").read_text()
        assert "cannot be split" in error and "BatchSampler" in error and "gather=False" in error


class _PidRecorder(dl.Callback):
    def __init__(self):
        super().__init__(order=dl.CallbackOrder.ExternalExtra)
        self.pids: list[int] = []

    def on_loader_end(self, runner):
        self.pids.append(os.getpid())


def test_a_ddp_amp_engine_without_a_group_infers_in_this_process_with_autocast():
    """The spawn-mode parent's situation: a DDP AMP engine, no launcher, no group."""
    logits, loss = _reference(infer.make_model().state_dict())
    loader = DataLoader(infer.Indexed(*infer.infer_data()), batch_size=4)
    engine = dl.DistributedDataParallelAMPEngine()
    runner = infer.InferRunner()
    outputs = list(runner.predict_loader(loader=loader, model=infer.make_model(), engine=engine))
    assert {o["logits"].dtype for o in outputs} == {torch.bfloat16}  # the engine's autocast
    _assert_all_in_order(outputs, logits.to(torch.bfloat16), tol=5e-2)
    assert runner.engine is engine  # the inference engine was lent only while predicting
    recorder = _PidRecorder()
    metrics = runner.evaluate_loader(loader, callbacks=[recorder])
    assert recorder.pids == [os.getpid()]  # in-process: no workers were spawned
    assert abs(metrics["ce"] - loss) <= 2e-2
    assert runner.engine is engine


# --------------------------------------------------------------------------------- compile
def _reference_training() -> dict[str, torch.Tensor]:
    """Plain torch: one epoch, batches of 16, SGD, the data of compile_train.py."""
    model = compiled.make_model()
    x = torch.randn(64, 5, generator=torch.Generator().manual_seed(0))
    y = x[:, :3].argmax(dim=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for start in range(0, 64, 16):
        optimizer.zero_grad()
        F.cross_entropy(model(x[start : start + 16]), y[start : start + 16]).backward()
        optimizer.step()
    return model.state_dict()


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _weights(folder, kind: str, tag: str) -> dict[str, torch.Tensor]:
    return torch.load(folder / f"weights_{kind}_{tag}.pt")


def _chain(folder, kind: str, tag: str) -> list[str]:
    return json.loads((folder / f"logs_{kind}_chain_{tag}.json").read_text())


def _model_state(folder, kind: str) -> dict:
    return load_checkpoint(folder / f"logs_{kind}" / "checkpoints" / "last.pth")["model_state_dict"]


PLAIN_KEYS = ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_compiled_model_trains_under_device_engine_with_inductor_and_checkpoints_load_both_ways(
    tmp_path,
):
    argv = script("compile_train", "--out", str(tmp_path), "--backend", "inductor")
    done = run(argv, cwd=tmp_path, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    reference = _reference_training()
    assert _max_diff(reference, compiled.make_model().state_dict()) > 1e-2  # it trained
    assert _max_diff(_weights(tmp_path, "plain", "main"), reference) <= 1e-5
    assert _max_diff(_weights(tmp_path, "compiled", "main"), reference) <= 1e-5
    assert _chain(tmp_path, "compiled", "main") == ["OptimizedModule", "Sequential"]
    info = json.loads((tmp_path / "model_main.json").read_text())
    assert info == {"type": "OptimizedModule", "inner": "Sequential", "is_given_object": True}
    # checkpoints: no "_orig_mod." prefix; each loads into the other kind of model
    compiled_state, plain_state = (
        _model_state(tmp_path, "compiled"),
        _model_state(tmp_path, "plain"),
    )
    assert list(compiled_state) == PLAIN_KEYS
    into_plain = compiled.make_model()
    unpack_checkpoint({"model_state_dict": compiled_state}, model=into_plain)
    assert _max_diff(into_plain.state_dict(), compiled_state) == 0.0
    into_compiled = torch.compile(compiled.make_model(), backend="eager")
    unpack_checkpoint({"model_state_dict": plain_state}, model=into_compiled)
    assert _max_diff(into_compiled._orig_mod.state_dict(), plain_state) == 0.0


def test_a_compiled_model_predicts_from_an_uncompiled_checkpoint(tmp_path):
    """predict_loader(resume=...) loads a plain checkpoint into a compiled model and runs it."""
    plain = compiled.make_model()
    with torch.no_grad():
        plain[0].weight.mul_(2)  # not the compiled model's starting weights
    path = tmp_path / "plain.pth"
    torch.save({"model_state_dict": plain.state_dict()}, path)
    x = torch.randn(10, 5, generator=torch.Generator().manual_seed(3))

    class Predict(dl.Runner):
        def predict_batch(self, batch):
            return self.model(batch[0])

    model = torch.compile(compiled.make_model(), backend="eager")
    loader = DataLoader(torch.utils.data.TensorDataset(x), batch_size=5)
    runner = Predict()
    outputs = list(runner.predict_loader(loader=loader, model=model, resume=str(path)))
    with torch.no_grad():
        expected = plain(x)
    assert float((torch.cat(outputs) - expected).abs().max()) <= 1e-6
    assert runner.model is model  # still the user's compiled model


def test_compiled_model_trains_under_amp_engine(tmp_path):
    argv = script("compile_train", "--out", str(tmp_path), "--engine", "amp")
    done = run(argv, cwd=tmp_path, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    plain, compiled_weights = (_weights(tmp_path, kind, "main") for kind in ("plain", "compiled"))
    assert _max_diff(plain, _reference_training()) <= 5e-3  # bf16 autocast
    assert _max_diff(compiled_weights, plain) <= 1e-5
    assert list(_model_state(tmp_path, "compiled")) == PLAIN_KEYS


def test_compiled_model_trains_under_spawned_ddp(tmp_path):
    argv = script("compile_train", "--out", str(tmp_path), "--engine", "ddp")
    done = run(argv, cwd=tmp_path, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    reference = _reference_training()
    # the parent holds rank 0's weights: 2 ranks x batch 8 = one process x batch 16
    assert _max_diff(_weights(tmp_path, "plain", "main"), reference) <= 1e-5
    assert _max_diff(_weights(tmp_path, "compiled", "main"), reference) <= 1e-5
    for rank in (0, 1):  # torch's order: DDP around the original module, compiled outside
        chain = _chain(tmp_path, "compiled", f"rank{rank}")
        assert chain == ["OptimizedModule", "DistributedDataParallel", "Sequential"]
    assert list(_model_state(tmp_path, "compiled")) == PLAIN_KEYS
    info = json.loads((tmp_path / "model_main.json").read_text())
    assert info == {"type": "OptimizedModule", "inner": "Sequential", "is_given_object": True}


def test_compiled_dict_model_trains_under_launched_ddp_amp(tmp_path):
    argv = ddprun(2, "compile_train", "--out", str(tmp_path), "--engine", "ddp_amp", "--dict")
    done = run(argv, cwd=tmp_path, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    rank0 = _weights(tmp_path, "compiled", "rank0")
    assert _max_diff(rank0, _weights(tmp_path, "compiled", "rank1")) == 0.0
    assert _max_diff(rank0, _weights(tmp_path, "plain", "rank0")) <= 1e-5
    assert _max_diff(rank0, _reference_training()) <= 5e-3  # bf16 autocast
    chain = _chain(tmp_path, "compiled", "rank1")
    assert chain == ["OptimizedModule", "DistributedDataParallel", "Sequential"]
    assert {k: list(v) for k, v in _model_state(tmp_path, "compiled").items()} == {
        "net": PLAIN_KEYS
    }
    for rank in (0, 1):  # after train: compiled, around the plain module (no DDP inside)
        info = json.loads((tmp_path / f"model_rank{rank}.json").read_text())
        assert (info["type"], info["inner"]) == ("OptimizedModule", "Sequential")
