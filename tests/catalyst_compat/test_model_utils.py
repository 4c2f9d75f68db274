"""Catalyst 21.12's model utilities (issue 12, item 6): checkpoint averaging equals the hand
average (ddprun checkpoints, dict models, bare state dicts), and trace_model, quantize_model,
prune_model and onnx_export give working artifacts; optional packages are named when missing
and never imported by ``import ddprun``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ddprun import dl, utils
from ddprun.checkpoint import CheckpointError, pack_checkpoint, save_checkpoint
from tests.workloads.helpers import run

pytestmark = pytest.mark.timeout(240)


def _ok(done) -> None:
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


# ------------------------------------------------------------------ averaging
def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _train_with_epoch_checkpoints(logdir: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=generator)
    data = TensorDataset(x, x[:, :3].argmax(dim=1))
    loaders = {"train": DataLoader(data, batch_size=16), "valid": DataLoader(data, batch_size=32)}
    torch.manual_seed(0)
    model = _model()
    dl.SupervisedRunner().train(
        model=model,
        criterion=nn.CrossEntropyLoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        loaders=loaders,
        num_epochs=3,
        callbacks=[dl.CheckpointCallback(logdir, "valid", "loss", minimize=True, save_n_best=3)],
        loggers={},
    )


def test_averaged_weights_equal_the_hand_average(tmp_path):
    logdir = tmp_path / "logs"
    _train_with_epoch_checkpoints(logdir)
    files = sorted((logdir / "checkpoints").glob("train.*.pth"))
    assert [f.name for f in files] == ["train.1.pth", "train.2.pth", "train.3.pth"]
    states = [torch.load(f, weights_only=False)["model_state_dict"] for f in files]
    averaged = utils.get_averaged_weights_by_path_mask(path_mask="train.*.pth", logdir=logdir)
    assert list(averaged) == list(states[0])
    for key, value in averaged.items():
        expected = sum(s[key].double() for s in states) / 3
        assert value.dtype == states[0][key].dtype, key
        if value.is_floating_point():
            assert torch.allclose(value.double(), expected, atol=1e-7), key
        else:  # num_batches_tracked: 4, 8, 12 batches -> 8
            assert value.item() == round(expected.item()), key
    assert averaged["1.num_batches_tracked"].item() == 8
    # the weights load and differ from every single epoch
    model = _model()
    model.load_state_dict(averaged)
    assert not torch.equal(model[0].weight, states[-1]["0.weight"])
    # a glob without logdir; best.pth and last.pth are matched too
    everything = utils.get_averaged_weights_by_path_mask(str(logdir / "checkpoints" / "*.pth"))
    folder = logdir / "checkpoints"
    five = states + [
        torch.load(folder / name, weights_only=False)["model_state_dict"]
        for name in ("best.pth", "last.pth")
    ]
    expected = sum(s["0.weight"] for s in five) / 5
    assert torch.allclose(everything["0.weight"], expected, atol=1e-6)


def test_averaging_dict_models_bare_state_dicts_and_errors(tmp_path):
    torch.manual_seed(0)
    pairs = [{"a": nn.Linear(3, 2), "b": nn.Linear(2, 1)} for _ in range(2)]
    for i, models in enumerate(pairs):
        save_checkpoint(pack_checkpoint(model=models), tmp_path / f"dict.{i}.pth")
        torch.save(models["a"].state_dict(), tmp_path / f"bare.{i}.pth")
    averaged = utils.get_averaged_weights_by_path_mask(str(tmp_path / "dict.*.pth"))
    assert set(averaged) == {"a", "b"}
    for key in ("a", "b"):
        for name, value in averaged[key].items():
            hand = (pairs[0][key].state_dict()[name] + pairs[1][key].state_dict()[name]) / 2
            assert torch.allclose(value, hand), (key, name)
    bare = utils.get_averaged_weights_by_path_mask(str(tmp_path / "bare.*.pth"))
    assert torch.allclose(bare["weight"], averaged["a"]["weight"])

    # Catalyst's README mask ("./logs/*.pth") matches nothing: the run's files are one folder
    # down; the error says where instead of failing on an empty list
    (tmp_path / "logs" / "checkpoints").mkdir(parents=True)
    save_checkpoint(pack_checkpoint(model=pairs[0]["a"]), tmp_path / "logs/checkpoints/x.pth")
    with pytest.raises(FileNotFoundError, match=r"no file matches .*checkpoints"):
        utils.get_averaged_weights_by_path_mask(str(tmp_path / "logs" / "*.pth"))
    torch.save(nn.Linear(3, 3).state_dict(), tmp_path / "bare.9.pth")
    with pytest.raises(CheckpointError, match="shapes"):
        utils.get_averaged_weights_by_path_mask(str(tmp_path / "bare.*.pth"))
    torch.save(nn.Linear(3, 2, bias=False).state_dict(), tmp_path / "bare.9.pth")
    with pytest.raises(CheckpointError, match=r"missing \['bias'\]"):
        utils.get_averaged_weights_by_path_mask(str(tmp_path / "bare.*.pth"))


# ----------------------------------------------------- trace, quantize, prune
class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(10, 4), nn.Linear(2, 4)

    def forward(self, inp_1, inp_2):
        return self.lin1(inp_1), self.lin2(inp_2)

    def first_only(self, inp_1):
        return self.lin1(inp_1)


def test_trace_model_gives_a_working_saved_module(tmp_path):
    torch.manual_seed(0)
    model = TwoHeads().eval()
    x1, x2 = torch.randn(3, 10), torch.randn(3, 2)
    traced = utils.trace_model(model, batch=torch.randn(1, 10), method_name="first_only")
    torch.jit.save(traced, tmp_path / "first.pt")
    loaded = torch.jit.load(tmp_path / "first.pt")
    assert torch.allclose(loaded(x1), model.first_only(x1))  # batch 3, traced with batch 1
    both = utils.trace_model(nn.DataParallel(model), batch=(x1, x2))  # the wrapper is removed
    assert all(torch.allclose(a, b) for a, b in zip(both(x1, x2), model(x1, x2)))
    keyword = utils.trace_model(model, batch={"inp_1": x1, "inp_2": x2})
    assert torch.allclose(keyword(x1, x2)[1], model(x1, x2)[1])
    with pytest.raises(AttributeError, match="no method 'second'"):
        utils.trace_model(model, batch=x1, method_name="second")


def test_quantize_model_returns_a_quantized_copy():
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3))
    before = [p.clone() for p in model.parameters()]
    x = torch.randn(8, 4, 4)
    for dtype in ("qint8", torch.qint8):
        quantized = utils.quantize_model(model=model, dtype=dtype)
        assert [isinstance(m, DynamicLinear) for m in quantized] == [False, True, False, True]
        assert quantized is not model
        assert torch.allclose(quantized(x), model(x), atol=0.05)
    assert all(isinstance(m, nn.Linear) for m in (model[1], model[3]))  # the model is untouched
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    only_last = utils.quantize_model(model, qconfig_spec={"3"})
    assert type(only_last[1]) is nn.Linear and isinstance(only_last[3], DynamicLinear)
    with pytest.raises(ValueError, match="'int4' is not one of"):
        utils.quantize_model(model, dtype="int4")


def test_prune_model_zeroes_the_requested_fraction():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    utils.prune_model(model=model, pruning_fn="l1_unstructured", amount=0.8)
    for layer in (model[0], model[2]):
        weight = layer.weight
        assert int((weight == 0).sum()) == round(0.8 * weight.numel())
        kept = weight[weight != 0].abs()
        assert kept.min() >= layer.weight_orig[weight == 0].abs().max()  # the largest stay
    assert model(torch.randn(4, 10)).shape == (4, 5)
    utils.remove_reparametrization(model, keys_to_prune=["weight"])
    assert not hasattr(model[0], "weight_orig") and "weight" in dict(model[0].named_parameters())
    assert int((model[0].weight == 0).sum()) == 160  # permanent

    structured = nn.Sequential(nn.Linear(10, 6), nn.Linear(6, 2))
    utils.prune_model(structured, "ln_structured", amount=2, layers_to_prune=["0"], dim=0, l_norm=2)
    assert int((structured[0].weight.abs().sum(dim=1) == 0).sum()) == 2  # two whole rows
    assert not hasattr(structured[1], "weight_mask")
    with pytest.raises(ValueError, match="pass dim="):
        utils.prune_model(structured, "random_structured", amount=0.5)
    with pytest.raises(ValueError, match=r"no module named \['9'\]"):
        utils.prune_model(structured, "l1_unstructured", amount=0.5, layers_to_prune=["9"])
    with pytest.raises(ValueError, match="no layer has a parameter named"):
        utils.prune_model(structured, "l1_unstructured", amount=0.5, keys_to_prune=["gamma"])


def test_onnx_export_writes_a_valid_model_that_runs(tmp_path):
    onnx = pytest.importorskip("onnx")
    torch.manual_seed(0)
    model = TwoHeads()
    path = tmp_path / "export" / "first.onnx"
    proto = utils.onnx_export(
        model=model,
        batch=torch.randn(1, 10),
        file=str(path),
        method_name="first_only",
        input_names=["features"],
        output_names=["logits"],
        dynamic_axes={"features": {0: "batch"}, "logits": {0: "batch"}},
        return_model=True,
    )
    onnx.checker.check_model(onnx.load(str(path)))
    assert [i.name for i in proto.graph.input] == ["features"]
    assert proto.opset_import[0].version == 9  # Catalyst's default opset
    assert (
        utils.onnx_export(model, (torch.randn(1, 10), torch.randn(1, 2)), tmp_path / "b.onnx")
        is None
    )
    onnx.checker.check_model(onnx.load(str(tmp_path / "b.onnx")))
    onnxruntime = pytest.importorskip("onnxruntime")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 10)  # another batch size: the dynamic axis
    (out,) = session.run(["logits"], {"features": x.numpy()})
    assert torch.allclose(torch.from_numpy(out), model.first_only(x).detach(), atol=1e-5)


_BLOCKED = """
import sys
from pathlib import Path
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"mlflow", "wandb", "optuna", "onnx"}:
            raise ImportError(f"No module named {name!r} (blocked)")
sys.meta_path.insert(0, Block())
import torch
from ddprun import dl, utils
messages = []
for make in (
    lambda: dl.MLflowLogger(experiment="e"),
    lambda: dl.WandbLogger(project="p"),
    lambda: dl.OptunaPruningCallback("valid", "loss", True),
    lambda: utils.onnx_export(torch.nn.Linear(2, 2), torch.zeros(1, 2), "m.onnx"),
):
    try:
        make()
    except ImportError as error:
        messages.append(str(error))
print("\\n".join(messages))
"""


def test_missing_extras_are_named_and_not_imported_by_ddprun(tmp_path):
    light = (
        "import sys, ddprun, ddprun.dl, ddprun.utils; print(sorted(m for m in sys.modules "
        "if m.split('.')[0] in {'mlflow', 'wandb', 'optuna', 'onnx'} or m.startswith('torch.onnx')))"
    )
    done = run([sys.executable, "-c", light], cwd=tmp_path, timeout=60)
    _ok(done)
    assert done.stdout.strip() == "[]"
    done = run([sys.executable, "-c", _BLOCKED], cwd=tmp_path, timeout=60)
    _ok(done)
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 4, done.stdout
    for line, (feature, extra) in zip(
        lines,
        [
            ("MLflowLogger", "mlflow"),
            ("WandbLogger", "wandb"),
            ("OptunaPruningCallback", "optuna"),
            ("onnx_export", "onnx"),
        ],
    ):
        assert line.startswith(f"{feature} needs the optional package '{extra}'"), line
        assert f'pip install "ddprun[{extra}]"' in line, line
    assert not (tmp_path / "m.onnx").exists()
