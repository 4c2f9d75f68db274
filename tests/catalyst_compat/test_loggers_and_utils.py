"""Catalyst 21.12's experiment integrations (issue 12, item 9) with the real optional packages:
MLflowLogger (file store, sqlite) and WandbLogger (offline) make one run, from rank 0 only, with
the values of a one-process run; OptunaPruningCallback prunes the bad trial, and on 2 ranks
every rank stops at the same epoch. The model utilities (item 6) are in test_model_utils.py."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ddprun import dl
from tests.workloads.helpers import run

SCRIPTS = Path(__file__).parent / "scripts"
pytestmark = pytest.mark.timeout(240)


def _script(name: str, *args: str) -> list[str]:
    return [sys.executable, str(SCRIPTS / f"{name}.py"), *args]


def _launched(name: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "ddprun", "--nproc", "2", str(SCRIPTS / f"{name}.py"), *args]


def _ok(done) -> None:
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


# -------------------------------------------------------------------- MLflow
def _mlflow_runs(uri: str):
    mlflow = pytest.importorskip("mlflow")
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("ddprun-compat")
    return client, client.search_runs([experiment.experiment_id])


def _check_mlflow(uri: str, out: Path, tmp_path: Path) -> dict[str, list[float]]:
    from PIL import Image

    client, runs = _mlflow_runs(uri)
    assert len(runs) == 1, [r.info.run_id for r in runs]  # one run, however many ranks
    (run_,) = runs
    assert (run_.info.run_name, run_.info.status) == ("tiny", "FINISHED")
    assert run_.data.params == {"lr": "0.02", "model/hidden": "16"}  # "secret" excluded
    epochs = json.loads((out / "result.json").read_text())["epochs"]
    logged = {}
    for loader in ("train", "valid"):
        history = client.get_metric_history(run_.info.run_id, f"loss/{loader}/epoch")
        steps = [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)]
        expected = [(e["global_epoch_step"], e["metrics"][loader]["loss"]) for e in epochs]
        assert [s for s, _ in steps] == [1, 2]
        assert [v for _, v in steps] == pytest.approx([v for _, v in expected], abs=1e-12)
        logged[loader] = [v for _, v in steps]
    names = sorted(a.path for a in client.list_artifacts(run_.info.run_id))
    assert names == [f"{t}_scope_loader_epoch_{e}.png" for t in ("chw", "sample") for e in (1, 2)]
    local = client.download_artifacts(run_.info.run_id, names[0], str(tmp_path / "dl"))
    assert Image.open(local).size == (6, 8)  # the CxHxW tensor, as W x H
    return logged


def test_mlflow_file_store_single_process_and_sqlite_on_two_ranks(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for it, 2 ignores it
    single, multi = tmp_path / "single", tmp_path / "multi"
    file_uri = (tmp_path / "mlruns").as_uri()
    sqlite_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ("--logger", "mlflow", "--out")
    _ok(run(_script("tracking_loggers", *argv, str(single), "--uri", file_uri), cwd=tmp_path))
    done = run(
        _launched("tracking_loggers", *argv, str(multi), "--uri", sqlite_uri, "--batch-size", "16"),
        cwd=tmp_path,
        timeout=200,
    )
    _ok(done)
    # the logger was built on both ranks; only rank 0's runner held it
    assert json.loads((multi / "rank0.json").read_text())["loggers"] == ["tracker"]
    assert json.loads((multi / "rank1.json").read_text())["loggers"] == []
    one = _check_mlflow(file_uri, single, tmp_path / "a")
    two = _check_mlflow(sqlite_uri, multi, tmp_path / "b")
    for loader in ("train", "valid"):
        assert two[loader] == pytest.approx(one[loader], abs=1e-5)


class _FailsInEpoch2(dl.Runner):
    def handle_batch(self, batch):
        if self.global_epoch_step == 2:
            raise RuntimeError("boom in epoch 2")
        x, y = batch
        self.batch_metrics["loss"] = nn.functional.cross_entropy(self.model(x), y)


def test_mlflow_run_status_and_a_run_the_user_started(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.chdir(tmp_path)
    previous = mlflow.get_tracking_uri()
    uri = (tmp_path / "mlruns").as_uri()
    data = TensorDataset(torch.randn(8, 3), torch.zeros(8, dtype=torch.long))
    loaders = {"train": DataLoader(data, batch_size=4)}
    try:
        logger = dl.MLflowLogger(experiment="status", run="fails", tracking_uri=uri)
        with pytest.raises(RuntimeError, match="boom in epoch 2"):
            _FailsInEpoch2().train(
                model=nn.Linear(3, 2), loaders=loaders, num_epochs=3, loggers={"m": logger}
            )
        assert mlflow.active_run() is None  # the logger ended the run it started
        # a run the user started is logged into and left open for the user to end
        with mlflow.start_run(run_name="outer") as outer:
            logger = dl.MLflowLogger(experiment="status", tracking_uri=uri)
            dl.SupervisedRunner().train(
                model=nn.Linear(3, 2),
                loaders=loaders,
                criterion=nn.CrossEntropyLoss(),
                num_epochs=2,
                loggers={"m": logger},
                hparams={"lr": 0.5},
            )
            assert mlflow.active_run().info.run_id == outer.info.run_id
        client = mlflow.MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("status").experiment_id])
        by_name = {r.info.run_name: r for r in runs}
        assert set(by_name) == {"fails", "outer"}
        failed = by_name["fails"]
        assert failed.info.status == "FAILED"
        history = client.get_metric_history(failed.info.run_id, "loss/train/epoch")
        assert [m.step for m in history] == [1]  # epoch 1 was logged before the failure
        assert by_name["outer"].info.status == "FINISHED"
        assert by_name["outer"].data.params == {"lr": "0.5"}
        assert "loss/train/epoch" in by_name["outer"].data.metrics
    finally:
        while mlflow.active_run() is not None:
            mlflow.end_run()
        mlflow.set_tracking_uri(previous)


# ----------------------------------------------------------------------- W&B
def _wandb_records(path: Path):
    """The records of an offline run's ``run-<id>.wandb`` file (a LevelDB-style log of
    protobuf records: 32 KiB blocks, each chunk with a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, block, pending = 7, 32768, b""
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # block trailer
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if length == 0 and kind == 0:  # zero padding to the block's end
            position += left
            continue
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _check_wandb(out: Path) -> dict[str, list[float]]:
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs  # one run, however many ranks
    records = list(_wandb_records(next(runs[0].glob("run-*.wandb"))))
    kinds = [r.WhichOneof("record_type") for r in records]
    (info,) = [r.run for r, k in zip(records, kinds) if k == "run"]
    assert (info.display_name, info.project) == ("tiny", "ddprun-compat")
    config = {
        i.key: json.loads(i.value_json)
        for r, k in zip(records, kinds)
        if k == "config"
        for i in r.config.update
    }
    assert {k: config[k] for k in ("lr", "model")} == {"lr": 0.02, "model": {"hidden": 16}}
    history = [
        {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
        for r, k in zip(records, kinds)
        if k == "history"
    ]
    epochs = json.loads((out / "result.json").read_text())["epochs"]
    assert [h["_step"] for h in history] == [e["global_sample_step"] for e in epochs]
    logged = {}
    for loader in ("train", "valid"):
        logged[loader] = [h[f"loss_epoch/{loader}"] for h in history]
        expected = [e["metrics"][loader]["loss"] for e in epochs]
        assert logged[loader] == pytest.approx(expected, abs=1e-12)
    for epoch, step in enumerate(history, start=1):
        for tag in ("sample", "chw"):
            key = f"{tag}_scope_loader_epoch_{epoch}.png"
            assert (step[f"{key}/_type"], step[f"{key}/width"], step[f"{key}/height"]) == (
                "image-file",
                6,
                8,
            )
            assert (runs[0] / "files" / step[f"{key}/path"]).is_file()
    (exit_record,) = [r.exit for r, k in zip(records, kinds) if k == "exit"]
    assert exit_record.exit_code == 0
    return logged


def test_wandb_offline_single_process_and_two_ranks(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for name, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONFIG_DIR": str(tmp_path / "config"),
        "WANDB_CACHE_DIR": str(tmp_path / "cache"),
        "WANDB_DATA_DIR": str(tmp_path / "data"),
    }.items():
        monkeypatch.setenv(name, value)
    single, multi = tmp_path / "single", tmp_path / "multi"
    _ok(run(_script("tracking_loggers", "--logger", "wandb", "--out", str(single)), cwd=tmp_path))
    launched = _launched("tracking_loggers", "--logger", "wandb", "--out", str(multi))
    _ok(run([*launched, "--batch-size", "16"], cwd=tmp_path, timeout=200))
    assert json.loads((multi / "rank1.json").read_text())["loggers"] == []
    one, two = _check_wandb(single), _check_wandb(multi)
    for loader in ("train", "valid"):
        assert two[loader] == pytest.approx(one[loader], abs=1e-5)


# -------------------------------------------------------------------- Optuna
def _optuna_result(folder: Path, rank: int = 0) -> dict:
    return json.loads((folder / f"rank{rank}.json").read_text())


def test_optuna_prunes_the_bad_trial_and_both_ranks_stop_together(tmp_path):
    pytest.importorskip("optuna")
    single, multi = tmp_path / "single", tmp_path / "multi"
    _ok(run(_script("optuna_pruning", "--out", str(single)), cwd=tmp_path))
    done = run(
        _launched("optuna_pruning", "--out", str(multi), "--batch-size", "16"),
        cwd=tmp_path,
        timeout=200,
    )
    _ok(done)
    one = _optuna_result(single)
    assert [t["state"] for t in one["trials"]] == ["COMPLETE", "PRUNED", "COMPLETE"]
    # every epoch's valid loss was reported at its step; lr=0 was pruned after epoch 1
    for number, trial in enumerate(one["trials"]):
        losses = one["valid_losses"][str(number)]
        assert list(trial["intermediate"]) == [str(s) for s in range(1, len(losses) + 1)]
        assert list(trial["intermediate"].values()) == pytest.approx(losses, abs=1e-12)
    assert one["ended_at_epoch"] == {"0": 3, "1": 1, "2": 3}
    assert one["trials"][0]["value"] == pytest.approx(min(one["valid_losses"]["0"]))  # best_score

    rank0, rank1 = _optuna_result(multi, 0), _optuna_result(multi, 1)
    assert {e[0] for e in rank0["engines"].values()} == {"DistributedDataParallelEngine"}
    assert [e[1] for e in rank1["engines"].values()] == [1, 1, 1]
    # the same decisions on both ranks, at the same epoch, as in one process
    assert rank0["ended_at_epoch"] == rank1["ended_at_epoch"] == one["ended_at_epoch"]
    for result in (rank0, rank1):
        assert [t["state"] for t in result["trials"]] == ["COMPLETE", "PRUNED", "COMPLETE"]
    # only rank 0 reported; its values are the one-process values
    assert all(t["intermediate"] == {} for t in rank1["trials"])
    for ours, theirs in zip(rank0["trials"], one["trials"]):
        assert list(ours["intermediate"]) == list(theirs["intermediate"])
        assert list(ours["intermediate"].values()) == pytest.approx(
            list(theirs["intermediate"].values()), abs=1e-5
        )


def test_optuna_in_spawn_mode_is_refused_with_the_way_out(tmp_path):
    pytest.importorskip("optuna")
    done = run(_script("optuna_pruning", "--out", str(tmp_path), "--spawn"), cwd=tmp_path)
    _ok(done)
    result = _optuna_result(tmp_path)
    assert "spawn mode" in result["error"] and "python -m ddprun --nproc N" in result["error"]
    assert result["trials"][0]["state"] == "FAIL"


def test_optuna_callback_needs_a_trial():
    pytest.importorskip("optuna")
    data = TensorDataset(torch.randn(8, 3), torch.zeros(8, dtype=torch.long))
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="has no trial: pass trial="):
        dl.SupervisedRunner().train(
            model=model,
            criterion=nn.CrossEntropyLoss(),
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            loaders={"train": DataLoader(data, batch_size=4), "valid": DataLoader(data)},
            callbacks=[dl.OptunaPruningCallback("valid", "loss", minimize=True)],
            loggers={},
        )
