"""Checkpoint manifests (issue 14.6): every written checkpoint carries sizes and checksums;
`verify` names the damage; `newest_intact` picks the fallback."""

from __future__ import annotations

import hashlib
import os
import time
import zlib
from pathlib import Path

import pytest
import torch
from torch import nn

from ddprun import checkpoint_manifest, dl
from ddprun.atomic import remove_stale_temporaries
from ddprun.checkpoint import load_checkpoint, save_checkpoint
from ddprun.checkpoint_manifest import (
    FOLDER_MANIFEST,
    checkpoint_candidates,
    newest_intact,
    read_manifest,
    verify,
    write_folder_manifest,
)
from ddprun.engines.engine import IEngine
from tests.runner.helpers import SupervisedRunner, loaders, supervised_callbacks


def state(value: float = 1.0, size: int = 5000) -> dict:
    return {"model_state_dict": {"w": torch.full((size,), value)}, "step": int(value)}


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path, keep: int) -> None:
    with open(path, "rb+") as handle:
        handle.truncate(keep)


# ------------------------------------------------------------------ writing
@pytest.mark.parametrize("algorithm", ["crc32", "sha256"])
def test_saved_file_carries_a_manifest_matching_its_bytes(tmp_path, monkeypatch, algorithm):
    monkeypatch.setattr(checkpoint_manifest, "ALGORITHM", algorithm)
    path = save_checkpoint(state(), tmp_path / "x.pth")
    manifest = read_manifest(path)
    assert manifest["format"] == 1 and manifest["algorithm"] == algorithm
    data = path.read_bytes()
    archive = data[: manifest["size"]]
    # the checksum covers the archive as torch wrote it: comment length zero
    torch_wrote = archive[:-2] + b"\0\0"
    if algorithm == "sha256":
        assert hashlib.sha256(torch_wrote).hexdigest() == manifest["digest"]
    else:
        assert f"{zlib.crc32(torch_wrote):08x}" == manifest["digest"]
    assert data[manifest["size"] :].startswith(b"ddprun-manifest:")
    assert verify(path, require_manifest=True) == []
    assert os.listdir(tmp_path) == ["x.pth"]  # inside the file: no sidecar


@pytest.mark.parametrize("options", [{}, {"mmap": True}, {"weights_only": True}])
def test_sealed_file_still_loads_with_plain_torch_load(tmp_path, options):
    path = save_checkpoint({"w": torch.arange(10.0)}, tmp_path / "x.pth")
    assert torch.equal(torch.load(path, **options)["w"], torch.arange(10.0))
    assert torch.equal(load_checkpoint(path)["w"], torch.arange(10.0))


def test_every_target_of_an_engine_save_carries_a_manifest(tmp_path):
    targets = [tmp_path / name for name in ("last.pth", "best.pth", "train.3.pth")]
    IEngine("cpu").save_checkpoint(state(3.0), targets)
    for target in targets:
        assert verify(target, require_manifest=True) == [], target
        assert load_checkpoint(target)["step"] == 3
    assert len({read_manifest(t)["digest"] for t in targets}) == 1


def test_every_checkpoint_of_a_training_run_carries_a_manifest(tmp_path):
    torch.manual_seed(0)
    SupervisedRunner().train(
        model=nn.Linear(4, 1),
        loaders=loaders(),
        criterion=nn.MSELoss(),
        optimizer=torch.optim.SGD(nn.Linear(4, 1).parameters(), lr=0.1),
        callbacks=supervised_callbacks(),
        engine=dl.DeviceEngine("cpu"),
        loggers={},
        logdir=tmp_path,
        num_epochs=2,
    )
    files = sorted((tmp_path / "checkpoints").glob("*.pth"))
    assert {p.name for p in files} >= {"best.pth", "last.pth"}
    for path in files:
        assert verify(path, require_manifest=True) == [], path


# ------------------------------------------------------------------ verifying files
@pytest.mark.parametrize("cut", ["half", "minus_one", "trailer"])
def test_verify_names_a_truncated_file(tmp_path, cut):
    path = save_checkpoint(state(), tmp_path / "last.pth")
    size, archive = path.stat().st_size, read_manifest(path)["size"]
    keep = {"half": size // 2, "minus_one": size - 1, "trailer": archive}[cut]
    truncate(path, keep)
    problems = verify(path)
    assert len(problems) == 1 and "truncated" in problems[0] and str(path) in problems[0]


@pytest.mark.parametrize("algorithm", ["crc32", "sha256"])
@pytest.mark.parametrize("where", [0.1, 0.5, 0.9])
def test_verify_names_a_flipped_byte(tmp_path, monkeypatch, where, algorithm):
    monkeypatch.setattr(checkpoint_manifest, "ALGORITHM", algorithm)
    path = save_checkpoint(state(), tmp_path / "last.pth")
    flip_byte(path, int(read_manifest(path)["size"] * where))
    assert verify(path) == [
        f"{path}: checksum mismatch ({algorithm} of {read_manifest(path)['size']} bytes)"
    ]
    assert verify(path, checksums=False) == []  # sizes only: blind to it, as documented


def test_verify_names_a_missing_file(tmp_path):
    assert verify(tmp_path / "last.pth") == [f"{tmp_path / 'last.pth'}: missing"]


def test_files_without_a_manifest_are_unverified_and_accepted_unless_required(tmp_path):
    zipped, legacy = tmp_path / "old.pth", tmp_path / "legacy.pth"
    torch.save(state(), zipped)
    torch.save(state(), legacy, _use_new_zipfile_serialization=False)
    for path in (zipped, legacy):
        assert verify(path) == []
        assert len(verify(path, require_manifest=True)) == 1
        assert "no manifest" in verify(path, require_manifest=True)[0]
    truncate(zipped, zipped.stat().st_size - 10)
    assert "truncated" in verify(zipped)[0]  # damage is still seen without a manifest


# ------------------------------------------------------------------ folders
def make_folder(root: Path) -> Path:
    folder = root / "last"
    (folder / "sub").mkdir(parents=True)
    for rank in range(2):
        torch.save(state(rank), folder / f"__{rank}_0.distcp")
    (folder / ".metadata").write_bytes(b"metadata")
    (folder / "sub" / "extra.bin").write_bytes(os.urandom(1000))
    write_folder_manifest(folder)
    return folder


def test_folder_manifest_lists_every_file_and_verifies(tmp_path):
    folder = make_folder(tmp_path)
    listed = read_manifest(folder)["files"]
    assert set(listed) == {"__0_0.distcp", "__1_0.distcp", ".metadata", "sub/extra.bin"}
    assert verify(folder) == []


def test_folder_damage_is_named(tmp_path):
    folder = make_folder(tmp_path)
    (folder / "__1_0.distcp").unlink()
    truncate(folder / "__0_0.distcp", 100)
    flip_byte(folder / "sub" / "extra.bin", 10)
    problems = verify(folder)
    assert f"{folder}: missing shard __1_0.distcp" in problems
    assert any("truncated shard __0_0.distcp (100 of" in p for p in problems)
    assert f"{folder}: checksum mismatch in shard sub/extra.bin" in problems


def test_folder_without_manifest_is_an_unfinished_write(tmp_path):
    folder = make_folder(tmp_path)
    (folder / FOLDER_MANIFEST).unlink()
    assert verify(folder) == [f"{folder}: no {FOLDER_MANIFEST} (the write did not finish)"]


# ------------------------------------------------------------------ fallback
def test_newest_intact_skips_a_damaged_last_and_names_it(tmp_path):
    folder = tmp_path / "checkpoints"
    for epoch in (1, 2, 3):
        targets = [folder / "last.pth", folder / f"train.{epoch}.pth"]
        IEngine("cpu").save_checkpoint(state(float(epoch)), targets)
        time.sleep(0.01)  # distinct manifest times
    save_checkpoint(state(4.0), folder / "last.pth")  # a mid-epoch save, only last.pth
    truncate(folder / "last.pth", 300)
    (folder / ".last.pth.abc.tmp").write_bytes(b"debris of a killed write")
    candidates = checkpoint_candidates(folder)
    assert candidates[0].name == "last.pth" and ".last.pth.abc.tmp" not in {
        p.name for p in candidates
    }
    chosen, skipped = newest_intact(candidates)
    assert chosen == folder / "train.3.pth"
    assert skipped == [f"{folder / 'last.pth'}: truncated (no zip end record in its 300 bytes)"]
    assert load_checkpoint(chosen)["step"] == 3
    assert remove_stale_temporaries(folder) == [folder / ".last.pth.abc.tmp"]


def test_newest_intact_prefers_the_given_order_on_ties_and_returns_none_when_all_damaged(
    tmp_path,
):
    targets = [tmp_path / "last.pth", tmp_path / "best.pth"]
    IEngine("cpu").save_checkpoint(state(), targets)
    assert newest_intact(targets) == (targets[0], [])
    assert newest_intact(targets[::-1]) == (targets[1], [])
    flip_byte(targets[0], 50)  # hard links: both names are damaged
    chosen, skipped = newest_intact(targets)
    assert chosen is None and len(skipped) == 2
    assert all("checksum mismatch" in line for line in skipped)


def test_newest_intact_considers_folders_and_old_files(tmp_path):
    old = tmp_path / "old.pth"
    torch.save(state(), old)
    time.sleep(0.01)
    folder = make_folder(tmp_path)
    assert newest_intact([old, folder]) == (folder, [])
    (folder / FOLDER_MANIFEST).unlink()
    chosen, skipped = newest_intact([folder, old])
    assert chosen == old and "no manifest.json" in skipped[0]


def test_engine_choose_checkpoint_in_one_process(tmp_path):
    last, epoch = tmp_path / "last.pth", tmp_path / "train.1.pth"
    IEngine("cpu").save_checkpoint(state(1.0), [epoch])
    time.sleep(0.01)
    IEngine("cpu").save_checkpoint(state(2.0), [last])
    flip_byte(last, 40)
    chosen, skipped = IEngine("cpu").choose_checkpoint([last, epoch])
    assert chosen == epoch and len(skipped) == 1 and str(last) in skipped[0]


def test_stale_temporaries_include_a_killed_sharded_write_s_folder(tmp_path):
    # a sharded (FSDP) save writes a whole folder under a temporary name; a resume after a
    # kill during that write must clear it, not fail on it
    folder = tmp_path / "checkpoints"
    debris = folder / ".last.0123abcd.tmp"
    (debris / "sub").mkdir(parents=True)
    (debris / "__0_0.distcp").write_bytes(b"half a shard")
    (folder / ".best.pth.x1.tmp").write_bytes(b"half a file")
    (folder / "last.pth").write_bytes(b"kept")
    removed = remove_stale_temporaries(folder)
    assert sorted(p.name for p in removed) == [".best.pth.x1.tmp", ".last.0123abcd.tmp"]
    assert sorted(p.name for p in folder.iterdir()) == ["last.pth"]
