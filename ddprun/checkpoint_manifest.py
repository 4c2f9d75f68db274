"""Checkpoint manifests: sizes and checksums written with every checkpoint, and their checks.

A file checkpoint carries its manifest inside itself: torch writes a zip archive, and the
archive's end record may hold a comment of up to 64 KiB, which zip readers (torch's included,
``mmap=True`` too) skip. The comment is ``ddprun-manifest:`` + JSON with the size and checksum
of the archive as torch wrote it (comment length zero). The checksum is computed while torch
writes (`HashingWriter`), so sealing costs no second read. Being inside the file, the manifest
is renamed with it atomically, travels with hard links and copies, and leaves no sidecar behind
when a checkpoint is deleted.

A folder checkpoint (one file per shard) carries ``manifest.json``, written last, listing
every file with its size and checksum.

Policy for what has no manifest: a file written before manifests existed (a complete zip, or
torch's legacy format) is *unverified* and accepted, so older runs still resume; pass
``require_manifest=True`` to refuse it. A folder without ``manifest.json`` is an unfinished
write (folder checkpoints always had one) and counts as damaged.

Checksum: CRC-32 (``zlib``, standard library) by default, SHA-256 (``hashlib``) on request
(`ALGORITHM`); a manifest names its algorithm and `verify` reads either. Both release the GIL.
Measured here (one core): CRC-32 2.7 GB/s, SHA-256 0.75-1 GB/s (SHA-NI), blake2b 0.74, md5
0.43; verifying a 512 MiB file took 0.27 s with CRC-32, 0.82 s with SHA-256. The manifest
guards against accidental damage (truncation, flipped bits, lost shards), for which a 32-bit
CRC suffices; checkpoints are trusted files anyway (they are unpickled).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from ddprun.atomic import atomic_write_bytes

__all__ = [
    "FOLDER_MANIFEST",
    "HashingWriter",
    "checkpoint_candidates",
    "file_entry",
    "newest_intact",
    "read_manifest",
    "verify",
    "write_folder_manifest",
    "write_sealed",
]

FOLDER_MANIFEST = "manifest.json"
MAGIC = b"ddprun-manifest:"
ALGORITHM = "crc32"  # what new manifests use: "crc32" or "sha256" (see the module docstring)
CHUNK = 8 << 20  # reads for hashing: bounded memory, few system calls
_EOCD = b"PK\x05\x06"  # zip end-of-central-directory record: 22 bytes + comment
_EOCD_SIZE = 22
_ZIP_START = b"PK\x03\x04"


class _Crc32:
    """zlib's CRC-32 behind hashlib's update/hexdigest interface."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: Any) -> None:
        self.value = zlib.crc32(data, self.value)  # releases the GIL for large buffers

    def hexdigest(self) -> str:
        return f"{self.value:08x}"


def _hasher(algorithm: str) -> Any:
    if algorithm == "crc32":
        return _Crc32()
    if algorithm == "sha256":
        return hashlib.sha256()
    raise ValueError(f"unknown checksum algorithm {algorithm!r}")


class HashingWriter:
    """A binary stream wrapper that hashes and counts what passes through it to `handle`,
    remembering the last bytes (where a zip archive keeps its end record)."""

    def __init__(self, handle: IO[bytes], algorithm: str | None = None) -> None:
        self.handle = handle
        self.algorithm = algorithm or ALGORITHM
        self.size = 0
        self.tail = b""
        self._hash = _hasher(self.algorithm)

    def write(self, data: Any) -> int:
        """Hash `data`, then write it; returns its length, as file objects do."""
        view = memoryview(data).cast("B")
        self._hash.update(view)
        self.handle.write(view)
        self.size += len(view)
        self.tail = (self.tail + bytes(view[-_EOCD_SIZE:]))[-_EOCD_SIZE:]
        return len(view)

    def flush(self) -> None:
        """Flush the wrapped stream."""
        self.handle.flush()

    def hexdigest(self) -> str:
        """The checksum of everything written so far."""
        return self._hash.hexdigest()


def write_sealed(handle: IO[bytes], write: Callable[[IO[bytes]], Any]) -> dict[str, Any]:
    """Run ``write(stream)`` (e.g. ``torch.save(obj, stream)``) on a hashing wrapper of the
    seekable `handle`, then append the manifest as the zip comment; returns the manifest.

    Raises:
        ValueError: what `write` produced is not a zip archive ending in an empty comment.
    """
    stream = HashingWriter(handle)
    write(stream)
    stream.flush()
    if stream.size < _EOCD_SIZE or not stream.tail.startswith(_EOCD) or stream.tail[-2:] != b"\0\0":
        raise ValueError("cannot seal a checkpoint that is not a zip archive (torch.save's format)")
    manifest = {"format": 1, "algorithm": stream.algorithm, "size": stream.size}
    manifest.update(digest=stream.hexdigest(), created=time.time())
    trailer = MAGIC + json.dumps(manifest, sort_keys=True).encode()
    handle.seek(stream.size - 2)
    handle.write(struct.pack("<H", len(trailer)) + trailer)
    return manifest


# ------------------------------------------------------------------ reading
def _zip_comment(path: Path) -> tuple[bytes | None, int]:
    """The zip comment of `path` (None when no end record closes the file) and the size."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        start = max(0, size - (_EOCD_SIZE + 0xFFFF))
        handle.seek(start)
        tail = handle.read()
    position = tail.rfind(_EOCD, 0, max(0, len(tail) - _EOCD_SIZE + 4))  # a whole record
    while position >= 0:
        (length,) = struct.unpack("<H", tail[position + 20 : position + 22])
        if position + _EOCD_SIZE + length == len(tail):
            return tail[position + _EOCD_SIZE :], size
        position = tail.rfind(_EOCD, 0, position + 3)
    return None, size


def read_manifest(path: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of a file or folder checkpoint, or None when it has none (or it is
    unreadable)."""
    path = Path(path)
    try:
        if path.is_dir():
            return json.loads((path / FOLDER_MANIFEST).read_text())
        comment, _ = _zip_comment(path)
    except (OSError, ValueError):
        return None
    if not comment or not comment.startswith(MAGIC):
        return None
    try:
        return json.loads(comment[len(MAGIC) :])
    except ValueError:
        return None


def _digest(path: Path, length: int, algorithm: str, suffix: bytes = b"") -> str:
    """The `algorithm` checksum of the first `length` bytes of `path`, then `suffix`."""
    digest = _hasher(algorithm)
    buffer = bytearray(CHUNK)
    with open(path, "rb", buffering=0) as handle:
        left = length
        while left > 0:
            got = handle.readinto(memoryview(buffer)[: min(CHUNK, left)])
            if not got:
                break
            digest.update(memoryview(buffer)[:got])
            left -= got
    digest.update(suffix)
    return digest.hexdigest()


def file_entry(path: str | os.PathLike) -> dict[str, Any]:
    """``{"size", "digest"}`` of one file (`ALGORITHM`), read in 8 MiB chunks: a shard's
    manifest entry."""
    path = Path(path)
    size = path.stat().st_size
    return {"size": size, "digest": _digest(path, size, ALGORITHM)}


def write_folder_manifest(
    folder: str | os.PathLike, entries: Mapping[str, Mapping[str, Any]] | None = None
) -> Path:
    """Write ``<folder>/manifest.json`` atomically, listing every file of the folder checkpoint.

    Call it once every file is complete (every rank's shard: after the barrier). `entries`
    maps relative paths to `file_entry` results, e.g. computed by each rank for its own
    shards and gathered; without them every file under `folder` is read and hashed here.
    """
    folder = Path(folder)
    if entries is None:
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        entries = {
            p.relative_to(folder).as_posix(): file_entry(p)
            for p in files
            if p.name != FOLDER_MANIFEST and not _is_temporary(p)
        }
    manifest = {"format": 1, "algorithm": ALGORITHM, "created": time.time()}
    manifest["files"] = {name: dict(entry) for name, entry in sorted(entries.items())}
    return atomic_write_bytes(folder / FOLDER_MANIFEST, json.dumps(manifest, indent=1).encode())


def _is_temporary(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(".tmp")  # ddprun.atomic's names


# ---------------------------------------------------------------- verifying
def verify(
    path: str | os.PathLike, require_manifest: bool = False, checksums: bool = True
) -> list[str]:
    """What is wrong with the checkpoint at `path` (a file or a folder): an empty list when it
    is intact, else one line per problem naming it (missing, truncated, missing shard,
    checksum mismatch, no manifest).

    Args:
        require_manifest: also report a file that carries no manifest (see the module
            docstring: such files are accepted by default).
        checksums: False checks sizes only (no full read: fast, but blind to flipped bytes).
    """
    path = Path(path)
    if path.is_dir():
        return _verify_folder(path, checksums)
    if not path.is_file():
        return [f"{path}: missing"]
    try:
        return _verify_file(path, require_manifest, checksums)
    except OSError as error:
        return [f"{path}: unreadable ({error})"]


def _verify_file(path: Path, require_manifest: bool, checksums: bool) -> list[str]:
    comment, size = _zip_comment(path)
    if comment is None:
        with open(path, "rb") as handle:
            is_zip = handle.read(4) == _ZIP_START
        if is_zip:
            return [f"{path}: truncated (no zip end record in its {size} bytes)"]
        return [f"{path}: not a zip checkpoint, no manifest"] if require_manifest else []
    if not comment.startswith(MAGIC):
        return [f"{path}: no manifest (written before manifests)"] if require_manifest else []
    manifest = read_manifest(path)
    algorithm = manifest.get("algorithm") if isinstance(manifest, dict) else None
    if algorithm not in ("crc32", "sha256"):
        return [f"{path}: unreadable manifest"]
    expected, held = int(manifest.get("size", -1)), size - len(comment)
    if expected != held:
        return [f"{path}: truncated or altered (manifest says {expected} bytes, file holds {held})"]
    # the checksum covers the archive as torch wrote it: comment length zero
    if checksums and _digest(path, held - 2, algorithm, b"\0\0") != manifest.get("digest"):
        return [f"{path}: checksum mismatch ({algorithm} of {held} bytes)"]
    return []


def _verify_folder(folder: Path, checksums: bool) -> list[str]:
    manifest_path = folder / FOLDER_MANIFEST
    if not manifest_path.is_file():
        return [f"{folder}: no {FOLDER_MANIFEST} (the write did not finish)"]
    manifest = read_manifest(folder)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    algorithm = manifest.get("algorithm") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or algorithm not in ("crc32", "sha256"):
        return [f"{folder}: unreadable {FOLDER_MANIFEST}"]
    problems = []
    for name, entry in files.items():
        file = folder / name
        if not file.is_file():
            problems.append(f"{folder}: missing shard {name}")
            continue
        size, expected = file.stat().st_size, int(entry["size"])
        if size != expected:
            kind = "truncated" if size < expected else "oversized"
            problems.append(f"{folder}: {kind} shard {name} ({size} of {expected} bytes)")
        elif checksums and _digest(file, size, algorithm) != entry.get("digest"):
            problems.append(f"{folder}: checksum mismatch in shard {name}")
    return problems


# ----------------------------------------------------------------- fallback
def written_at(path: str | os.PathLike) -> float:
    """When a checkpoint was written: its manifest's time, else its modification time
    (-inf when it is gone)."""
    manifest = read_manifest(path)
    created = manifest.get("created") if isinstance(manifest, dict) else None
    if isinstance(created, (int, float)) and math.isfinite(created):
        return float(created)
    try:
        return Path(path).stat().st_mtime
    except OSError:
        return -math.inf


def newest_intact(
    candidates: Sequence[str | os.PathLike], require_manifest: bool = False
) -> tuple[Path | None, list[str]]:
    """The newest checkpoint of `candidates` that `verify` passes, and one line per newer
    candidate that it skipped (what is damaged).

    Candidates are ranked newest first by `written_at`; ties (hard links of one save share
    their manifest) keep the given order, so pass ``last.pth`` first. None when none is
    intact.
    """
    paths = [Path(c) for c in candidates]
    ranked = sorted(paths, key=written_at, reverse=True)  # sorted() is stable
    skipped: list[str] = []
    for path in ranked:
        problems = verify(path, require_manifest=require_manifest)
        if not problems:
            return path, skipped
        skipped.append("; ".join(problems))
    return None, skipped


def checkpoint_candidates(folder: str | os.PathLike) -> list[Path]:
    """Every checkpoint in `folder`: ``last.pth`` first, then the other ``*.pth`` files and
    the folder checkpoints (subfolders with a manifest or torch DCP ``.metadata``), by name;
    temporary files are left out."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        is_folder = path.is_dir() and any(
            (path / name).is_file() for name in (FOLDER_MANIFEST, ".metadata")
        )
        if is_folder or (path.is_file() and path.suffix == ".pth"):
            found.append(path)
    return sorted(found, key=lambda p: p.stem != "last")  # stable: last first
