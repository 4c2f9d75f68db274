"""Atomic file writes: a temp file in the same folder, flush, fsync, rename over the target.

A crash at any point leaves either the old file or the new one, never a truncated one, and
the temporary file is removed when the write fails. Imports nothing heavy (no torch).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_copy", "atomic_write", "atomic_write_bytes", "remove_stale_temporaries"]


def atomic_write(
    path: str | os.PathLike, write: Callable[[IO[Any]], Any], text: bool = False
) -> Path:
    """Write `path` through ``write(handle)`` (binary, or text with `text`), atomically."""

    def fill(tmp_name: str) -> None:
        mode = "w" if text else "wb"
        with open(tmp_name, mode, **({"newline": ""} if text else {})) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())

    return _replace_atomically(path, fill)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically."""
    return atomic_write(path, lambda handle: handle.write(data))


def atomic_copy(source: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Make `path` hold what `source` holds, atomically, without writing the data again.

    A hard link when the filesystem allows it (no bytes copied: best, last and the epoch file
    of one save share one inode, and a later atomic write of one of them replaces only that
    name), else a copy; either way through a temporary name renamed over `path`.
    """

    def fill(tmp_name: str) -> None:
        os.unlink(tmp_name)  # os.link needs a free name
        try:
            os.link(source, tmp_name)
        except OSError:  # another device, or a filesystem without hard links
            shutil.copyfile(source, tmp_name)
            with open(tmp_name, "rb+") as handle:
                os.fsync(handle.fileno())

    return _replace_atomically(path, fill)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files (and the temporary folders of sharded checkpoints) a killed
    process left in `folder` (``.<name>.*.tmp``: a write that never reached its rename);
    returns them. Call it only while nobody writes there (e.g. on rank 0 before a resumed run
    saves anything)."""
    folder = Path(folder)
    stale = sorted(folder.glob(".*.tmp")) if folder.is_dir() else []
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale


def _replace_atomically(path: str | os.PathLike, fill: Callable[[str], None]) -> Path:
    """A temporary file beside `path`, filled by ``fill(name)``, renamed over `path`; the
    temporary file is removed when anything fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        fill(tmp_name)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    # The rename itself is durable only once the directory entry is on disk.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
