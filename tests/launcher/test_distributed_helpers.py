"""ddprun.distributed helpers in one process, and the parent-death signal's real behaviour."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from ddprun import distributed
from ddprun.launch.worker import format_user_traceback, is_collateral

from .helpers import wait_until


@pytest.mark.timeout(30)
def test_helpers_outside_a_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in distributed.LAUNCH_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    assert distributed.get_rank() == -1
    assert distributed.get_world_size() == 1
    assert not distributed.is_launched()
    assert distributed.shutdown_process_group() is False
    for name, value in zip(distributed.LAUNCH_ENV_VARS, ["0", "1", "0", "127.0.0.1", "1"]):
        monkeypatch.setenv(name, value)
    assert distributed.is_launched()


@pytest.mark.timeout(10)
def test_find_free_port_can_be_bound() -> None:
    port = distributed.find_free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


_PDEATH_CHILD = """\
import os, signal, sys, time
from ddprun.distributed import set_parent_death_signal
assert set_parent_death_signal(signal.SIGTERM)
open(sys.argv[1], "w").write(str(os.getpid()))
time.sleep(60)
"""


def _spawn_parent(tmp_path: Path, from_thread: bool) -> subprocess.Popen:
    """A parent process that starts the child above, from its main thread or a short-lived one."""
    child = tmp_path / "child.py"
    child.write_text(_PDEATH_CHILD)
    code = textwrap.dedent(f"""
        import os, subprocess, sys, threading, time
        def start():
            subprocess.Popen([sys.executable, {str(child)!r}, {str(tmp_path / "pid")!r}])
            while not os.path.exists({str(tmp_path / "pid")!r}):  # the child has set its signal
                time.sleep(0.02)
            time.sleep(0.1)
        if {from_thread}:
            thread = threading.Thread(target=start); thread.start(); thread.join()
        else:
            start()
        time.sleep(60)
    """)
    return subprocess.Popen([sys.executable, "-c", code])


def _child_pid(tmp_path: Path) -> int:
    assert wait_until(lambda: (tmp_path / "pid").exists() and (tmp_path / "pid").read_text(), 20)
    return int((tmp_path / "pid").read_text())


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.timeout(40)
def test_parent_death_signal_fires_when_the_parent_is_sigkilled(tmp_path: Path) -> None:
    parent = _spawn_parent(tmp_path, from_thread=False)
    try:
        pid = _child_pid(tmp_path)
        time.sleep(0.2)
        assert not _gone(pid)
        parent.kill()
        parent.wait()
        assert wait_until(lambda: _gone(pid), 10)
    finally:
        parent.kill()
        if (tmp_path / "pid").exists():
            try:
                psutil.Process(int((tmp_path / "pid").read_text())).kill()
            except psutil.NoSuchProcess:
                pass


@pytest.mark.timeout(40)
def test_parent_death_signal_follows_the_forking_thread_not_the_process(tmp_path: Path) -> None:
    # Why ddprun's agent must start workers from its main thread: the kernel signals the child
    # when the *thread* that forked it exits, even though the parent process lives on.
    parent = _spawn_parent(tmp_path, from_thread=True)
    try:
        pid = _child_pid(tmp_path)
        assert wait_until(lambda: _gone(pid), 10)
        assert parent.poll() is None
    finally:
        parent.kill()
        parent.wait()


@pytest.mark.timeout(10)
def test_worker_traceback_hides_launcher_frames_and_flags_peer_loss() -> None:
    def user_code() -> None:
        raise ValueError("boom")

    try:
        user_code()
    except ValueError as exc:
        text = format_user_traceback(exc)
    assert "user_code" in text and text.rstrip().endswith("ValueError: boom")
    assert is_collateral(RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:5"))
    assert not is_collateral(ValueError("boom"))
