"""Sharded checkpoint folders: torch's distributed checkpoint format (DCP), one shard per rank.

Layout of one folder (``best``, ``last``, ``<stage>.<epoch>``)::

    .metadata            DCP: where every tensor piece lives
    __<rank>_0.distcp    DCP: the pieces rank <rank> holds (its shard of the model and optimizer)
    ddprun_state.pt      everything else (scheduler, scaler, counters, RNG, metrics, bookkeeping),
                         one torch file written by rank 0, as a file checkpoint would hold it

Which entries go to DCP: the top-level entries of a packed checkpoint that hold a DTensor (the
sharded model, optimizer and criterion states). Each rank writes only its own pieces; nothing is
gathered on one rank. A folder is written under a temporary name beside its target and then
published at once (`publish`: an atomic exchange with the previous folder where the OS has one,
Linux ``renameat2(RENAME_EXCHANGE)``), so a reader finds the old folder or the new one, complete.

`consolidate` reads a folder back in one plain process (no process group) as the full checkpoint
dict a file checkpoint holds: plain tensors, and optimizer states in torch's own numbered layout
(DCP keeps them by parameter name). `convert` writes that dict as one ``.pth`` file;
``python -m ddprun.checkpoint_folders SRC DST.pth`` does the same from the shell. Like file
checkpoints, ``ddprun_state.pt`` holds Python and NumPy RNG states, so it is read with
``weights_only=False``: read only folders you trust.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ddprun.atomic import _fsync_dir
from ddprun.checkpoint import CheckpointError, save_checkpoint

__all__ = [
    "STATE_FILE",
    "ShardedEntry",
    "consolidate",
    "convert",
    "is_sharded_folder",
    "load_shards",
    "optimizer_to_names",
    "optimizer_to_numbers",
    "publish",
    "read_state",
    "remove_folder",
    "split_sharded",
    "write_folder",
]

STATE_FILE = "ddprun_state.pt"
#: key, in ddprun_state.pt, of the list of entries stored in DCP
SHARDED_KEYS = "_sharded_entries"


@dataclass(frozen=True)
class ShardedEntry:
    """Stands for the sharded entry `key` of the folder `folder` in a checkpoint dict that the
    FSDP engine read (its `unpack_checkpoint` loads it into the live, sharded components)."""

    folder: Path
    key: str


def is_sharded_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a sharded checkpoint folder (a folder with DCP's ``.metadata``)."""
    return Path(path, ".metadata").is_file()


def split_sharded(obj: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(entries holding a DTensor anywhere, the other entries) of a packed checkpoint."""
    sharded, rest = {}, {}
    for key, value in obj.items():
        (sharded if _holds_dtensor(value) else rest)[key] = value
    return sharded, rest


def _holds_dtensor(value: Any) -> bool:
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return True
    if isinstance(value, Mapping):
        return any(_holds_dtensor(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_dtensor(v) for v in value)
    return False


# ------------------------------------------------------------------ writing
def temp_folder(target: Path) -> Path:
    """A fresh temporary name beside `target` (hidden, ends in ``.tmp``)."""
    return target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}.tmp"


def remove_stale_temps(target: Path) -> None:
    """Remove temporary folders a killed writer left for `target`."""
    if target.parent.is_dir():
        for stale in target.parent.glob(f".{target.name}.*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)


def write_folder(
    sharded: Mapping[str, Any],
    rest: Mapping[str, Any],
    folder: Path,
    is_writer: bool,
    group: Any = None,
) -> None:
    """Write one checkpoint into `folder` (a temporary name; `publish` moves it in place).

    Every rank of `group` calls this: each writes its DCP pieces of `sharded` (files are
    fsynced); then the writer (rank 0) adds ``ddprun_state.pt`` with `rest`. DCP's own
    collectives run on `group` (ddprun passes a CPU group with the checkpoint timeout).
    """
    import torch.distributed.checkpoint as dcp

    dcp.save(dict(sharded), storage_writer=_dcp_writer(folder), process_group=group)
    if is_writer:
        _write_rest(rest, sharded, folder)


def write_folder_async(
    sharded: Mapping[str, Any],
    rest: Mapping[str, Any],
    folder: Path,
    is_writer: bool,
    group: Any = None,
) -> Any:
    """`write_folder` in the background: the writer (rank 0) writes ``ddprun_state.pt`` (the
    small, unsharded entries) now; every rank's DCP pieces of `sharded` are staged to CPU
    memory here and written by ``torch.distributed.checkpoint.async_save``. Returns its
    future (done when this rank's pieces and the folder's metadata are written)."""
    import torch.distributed.checkpoint as dcp

    if is_writer:
        folder.mkdir(parents=True, exist_ok=True)
        _write_rest(rest, sharded, folder)
    return dcp.async_save(dict(sharded), storage_writer=_dcp_writer(folder), process_group=group)


def _dcp_writer(folder: Path) -> Any:
    import torch.distributed.checkpoint as dcp

    return dcp.FileSystemWriter(folder, single_file_per_rank=True, sync_files=True)


def _write_rest(rest: Mapping[str, Any], sharded: Mapping[str, Any], folder: Path) -> None:
    """``ddprun_state.pt``: the unsharded entries and the names of the sharded ones."""
    save_checkpoint({**rest, SHARDED_KEYS: sorted(sharded)}, folder / STATE_FILE)
    _fsync_dir(folder)


def publish(source: Path, target: Path) -> None:
    """Move the complete folder `source` to `target`, replacing a previous `target` at once.

    With an existing `target`, Linux swaps both names in one step (``renameat2`` with
    ``RENAME_EXCHANGE``) and the old folder, now at `source`, is removed. Where the system or
    filesystem cannot swap, the old folder is renamed aside first: a crash between the two
    renames leaves it at ``.<name>.<id>.old`` and no `target`.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        os.rename(source, target)
    elif _exchange(source, target):
        shutil.rmtree(source)
    else:
        aside = target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}.old"
        os.rename(target, aside)
        os.rename(source, target)
        shutil.rmtree(aside)
    _fsync_dir(target.parent)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where that is not available."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    status = renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange)
    if status == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(second))


def copy_folder(source: Path, target: Path) -> None:
    """Publish a copy of the folder `source` at `target`: hard links of its files where the
    filesystem allows (no bytes written; files are never modified in place), else copies."""
    temp = temp_folder(target)
    temp.mkdir(parents=True)
    try:
        for item in source.iterdir():
            try:
                os.link(item, temp / item.name)
            except OSError:
                shutil.copy2(item, temp / item.name)
        publish(temp, target)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def remove_folder(path: str | os.PathLike) -> None:
    """Delete a checkpoint folder (missing is fine)."""
    shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------ reading
def read_state(folder: str | os.PathLike) -> dict[str, Any]:
    """``ddprun_state.pt`` of a folder: every entry except the sharded ones, plus the list of
    sharded entry names under ``SHARDED_KEYS``."""
    from ddprun.checkpoint import load_checkpoint

    folder = Path(folder)
    if not is_sharded_folder(folder):
        raise CheckpointError(f"{folder} is not a sharded checkpoint folder (no .metadata)")
    if not (folder / STATE_FILE).is_file():
        raise CheckpointError(f"{folder} has no {STATE_FILE}: not written by ddprun")
    return load_checkpoint(folder / STATE_FILE)


def load_shards(templates: dict[str, Any], folder: str | os.PathLike, group: Any = None) -> None:
    """Fill `templates` (sharded state dicts of the live components, DTensors laid out for the
    current world size) in place from `folder`: DCP reads each rank's pieces from whichever
    shard files hold them, so a folder written by N ranks loads on M."""
    import torch.distributed.checkpoint as dcp

    dcp.load(templates, storage_reader=dcp.FileSystemReader(folder), process_group=group)


def consolidate(folder: str | os.PathLike) -> dict[str, Any]:
    """The full checkpoint dict of a sharded folder, read in this process with no process
    group: the same entries as a file checkpoint, plain CPU tensors, optimizer states in
    torch's numbered layout (`optimizer_to_numbers`). Holds the whole model in memory."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.format_utils import _load_state_dict

    folder = Path(folder)
    state = read_state(folder)
    state.pop(SHARDED_KEYS, None)
    sharded: dict[str, Any] = {}
    # the planner builds the dict from the metadata (nothing to match against), and no_dist
    # reads without a process group: DCP's own recipe for dcp_to_torch_save, kept in memory
    _load_state_dict(
        sharded,
        storage_reader=dcp.FileSystemReader(folder),
        planner=_EmptyStateDictLoadPlanner(),
        no_dist=True,
    )
    for key, value in sharded.items():
        state[key] = _numbered(value) if key.startswith("optimizer") else value
    return state


def _numbered(value: Any) -> Any:
    if _is_named_optimizer_state(value):
        return optimizer_to_numbers(value)
    if isinstance(value, Mapping):  # a dict of optimizers
        return {key: _numbered(v) for key, v in value.items()}
    return value


def _is_named_optimizer_state(value: Any) -> bool:
    groups = value.get("param_groups") if isinstance(value, Mapping) else None
    return (
        isinstance(groups, list)
        and "state" in value
        and all(isinstance(p, str) for g in groups for p in g.get("params", []))
    )


def optimizer_to_numbers(state: Mapping[str, Any]) -> dict[str, Any]:
    """Optimizer state keyed by parameter name (DCP's layout) -> torch's layout, where
    parameters are numbered 0, 1, ... in the order of the optimizer's param groups."""
    numbers: dict[str, int] = {}
    groups = []
    for group in state["param_groups"]:
        ids = [numbers.setdefault(name, len(numbers)) for name in group["params"]]
        groups.append({**group, "params": ids})
    named = state["state"]
    return {
        "state": {numbers[name]: value for name, value in named.items() if name in numbers},
        "param_groups": groups,
    }


def optimizer_to_names(state: Mapping[str, Any], names: list[str]) -> dict[str, Any]:
    """The inverse of `optimizer_to_numbers`: `names` are the parameter names in the order of
    the optimizer's param groups."""
    groups = [
        {**group, "params": [names[i] for i in group["params"]]} for group in state["param_groups"]
    ]
    return {"state": {names[i]: v for i, v in state["state"].items()}, "param_groups": groups}


def convert(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Write the sharded folder `source` as one checkpoint file `target` (atomically)."""
    return save_checkpoint(consolidate(source), target)


def main(argv: list[str] | None = None) -> int:
    """``python -m ddprun.checkpoint_folders SRC DST.pth``: consolidate one sharded folder."""
    parser = argparse.ArgumentParser(
        prog="python -m ddprun.checkpoint_folders",
        description="Turn a sharded (FSDP) checkpoint folder into one .pth checkpoint file.",
    )
    parser.add_argument("source", help="the sharded checkpoint folder (e.g. logs/checkpoints/best)")
    parser.add_argument("target", help="the .pth file to write")
    args = parser.parse_args(argv)
    try:
        path = convert(args.source, args.target)
    except (CheckpointError, FileNotFoundError) as error:
        parser.exit(2, f"error: {error}\n")
    size = path.stat().st_size
    print(f"wrote {path} ({size / 2**20:.1f} MiB) from {args.source}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
