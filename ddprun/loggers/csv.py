"""CSVLogger: one CSV file per loader with one row per epoch.

Layout: ``<logdir>/logs/<loader_key>.csv`` (``use_logdir_postfix=False`` drops the ``logs/``).
Each file has ONE header for the whole experiment, ``step,<sorted metric names>``, and one row per
epoch whose ``step`` is the runner's ``global_epoch_step``, so rows continue across stages. Files
are opened in append mode for each row and the header is read back from disk, so a new logger
instance (a later stage, a resumed run) continues the same file instead of repeating the header.
A row with metrics the header lacks rewrites the file with the widened header; older rows get
empty cells in the new columns.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from typing_extensions import override

from ddprun.atomic import atomic_write
from ddprun.loggers.base import ILogger, Scope, scalar_metrics

if TYPE_CHECKING:
    from ddprun.core.runner import IRunner

__all__ = ["CSVLogger"]

_STEP = "step"


def _read_header(path: Path) -> list[str] | None:
    """Returns the file's header columns, or None when the file is missing or empty."""
    if not path.is_file() or path.stat().st_size == 0:
        return None
    with path.open(newline="") as stream:
        return next(csv.reader(stream), None)


def _rewrite_with_header(path: Path, header: list[str]) -> None:
    """Rewrites ``path`` under a wider ``header``, atomically; missing cells stay empty."""
    with path.open(newline="") as stream:
        rows = list(csv.DictReader(stream))

    def write(stream: Any) -> None:
        writer = csv.DictWriter(stream, fieldnames=header, restval="")
        writer.writeheader()
        writer.writerows(rows)

    atomic_write(path, write, text=True)


class CSVLogger(ILogger):
    """Writes epoch metrics to ``<logdir>/logs/<loader_key>.csv``.

    Only the ``"epoch"`` scope is written: one row per loader key per epoch. ``_epoch_.csv`` (for
    epoch-level values such as ``lr``) appears only when that entry has values.

    Args:
        logdir: the RUN's log directory (the one given to the checkpoint callback too).
        use_logdir_postfix: write under ``<logdir>/logs/`` (default), else directly in ``logdir``.
    """

    def __init__(self, logdir: str | os.PathLike[str], use_logdir_postfix: bool = True) -> None:
        self.logdir = Path(logdir) / "logs" if use_logdir_postfix else Path(logdir)

    @override
    def log_metrics(self, metrics: Mapping[str, Any], scope: Scope, runner: IRunner) -> None:
        if scope != "epoch":
            return
        step = int(runner.global_epoch_step)
        for loader_key, values in metrics.items():
            row = scalar_metrics(values)
            if row:
                self._append(self.logdir / f"{loader_key}.csv", step, row)

    @override
    def log_hparams(self, hparams: Mapping[str, Any], runner: IRunner) -> None:
        self.logdir.mkdir(parents=True, exist_ok=True)
        text = json.dumps(dict(hparams), indent=2, sort_keys=True, default=str)
        (self.logdir / "hparams.json").write_text(text + "\n")

    def _append(self, path: Path, step: int, row: dict[str, float]) -> None:
        """Appends one row, writing or widening the header first when needed."""
        path.parent.mkdir(parents=True, exist_ok=True)
        header = _read_header(path)
        is_new = header is None
        if header is None:
            header = [_STEP, *sorted(row)]
        elif not set(row) <= set(header[1:]):
            header = [_STEP, *sorted(set(header[1:]) | set(row))]
            _rewrite_with_header(path, header)
        with path.open("a", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=header, restval="")
            if is_new:
                writer.writeheader()
            writer.writerow({_STEP: step, **{k: repr(v) for k, v in row.items()}})
            stream.flush()
