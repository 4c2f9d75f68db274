"""Stopping the launcher: SIGINT, SIGTERM (forwarded first) and SIGKILL leave no worker behind."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from .helpers import launched, read_output, wait_until, worker_processes, write_script

# Each rank announces itself, then idles in Python (so signals are handled at once).
# On SIGTERM a rank "saves" (writes a file) and exits, as a runner saving a checkpoint would.
SLEEPER = """\
import signal
def save_and_exit(signum, frame):
    open(os.path.join({folder!r}, f"saved-{{RANK}}"), "w").close()
    sys.exit(0)
if {save_on_sigterm}:
    signal.signal(signal.SIGTERM, save_and_exit)
dist.init_process_group(backend="gloo")
open(os.path.join({folder!r}, f"ready-{{RANK}}"), "w").close()
while True:
    time.sleep(0.1)
"""


def _start_and_wait_ready(tmp_path: Path, save_on_sigterm: bool = False):
    body = SLEEPER.format(folder=str(tmp_path), save_on_sigterm=save_on_sigterm)
    script = write_script(tmp_path, "sleeper.py", body)
    context = launched(tmp_path, "--nproc", "2", "--logdir", tmp_path / "logs", script)
    process = context.__enter__()
    ready = wait_until(lambda: all((tmp_path / f"ready-{rank}").exists() for rank in (0, 1)), 40)
    assert ready, read_output(tmp_path)
    assert len(worker_processes(str(tmp_path))) == 2
    return context, process


def _no_worker_left(tmp_path: Path, within: float) -> bool:
    return wait_until(lambda: worker_processes(str(tmp_path)) == [], within)


@pytest.mark.timeout(60)
def test_sigint_stops_every_worker_and_exits_130(tmp_path: Path) -> None:
    context, process = _start_and_wait_ready(tmp_path)
    try:
        process.send_signal(signal.SIGINT)
        assert _no_worker_left(tmp_path, 10)
        assert process.wait(10) == 130, read_output(tmp_path)
    finally:
        context.__exit__(None, None, None)


@pytest.mark.timeout(60)
def test_sigterm_is_forwarded_so_workers_can_save_then_exits_143(tmp_path: Path) -> None:
    context, process = _start_and_wait_ready(tmp_path, save_on_sigterm=True)
    try:
        process.send_signal(signal.SIGTERM)
        assert _no_worker_left(tmp_path, 10)
        assert process.wait(10) == 143, read_output(tmp_path)
        assert (tmp_path / "saved-0").exists() and (tmp_path / "saved-1").exists()
    finally:
        context.__exit__(None, None, None)


@pytest.mark.timeout(60)
def test_sigkill_of_the_launcher_leaves_no_orphan(tmp_path: Path) -> None:
    context, process = _start_and_wait_ready(tmp_path)
    try:
        start = time.monotonic()
        os.kill(process.pid, signal.SIGKILL)  # nothing in the launcher runs after this
        process.wait(10)
        assert _no_worker_left(tmp_path, 15), [p.info for p in worker_processes(str(tmp_path))]
        assert time.monotonic() - start < 15
    finally:
        context.__exit__(None, None, None)
