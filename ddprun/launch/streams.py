"""Moving worker output as bytes: to rank logs as lines, to the console as written.

- `Lines` turns a byte stream into complete lines in their final state: a line redrawn with
  carriage returns (a progress bar) is kept once, as a terminal would last show it.
- `Console` (one of the launcher's streams), `RankLog` (rank<N>.log) and `Route` (where one
  stream's bytes go) are the sinks.
- `FileFollower` follows redirect files as they grow (a worker never blocks on a file);
  `ChannelReader` copies a live channel (`open_channel`: a pty when the console is a terminal,
  else a FIFO) as soon as bytes arrive.

A launcher that leads its session without a controlling terminal gets FIFOs instead of ptys:
opening a terminal would make it that session's controlling terminal.
"""

from __future__ import annotations

import errno
import os
import select
import threading
import time
from typing import BinaryIO, TextIO

__all__ = [
    "ChannelReader",
    "Console",
    "FileFollower",
    "Follower",
    "Lines",
    "RankLog",
    "Route",
    "final_lines",
    "open_channel",
    "same_destination",
]

# How often file followers look for new output, and channel readers for a stop request.
_POLL_SECONDS = 0.05
_READ_BYTES = 65536
_MAX_LINE_BYTES = 1 << 20  # a "line" without newline this long is written out as it stands
_JOIN_SECONDS = 10.0  # a follower stuck on a blocked console must not hang the launcher
_DRAIN_SECONDS = 2.0  # at most this long for a live channel's last bytes (a writing orphan)
# Writes to the launcher's stdout and stderr (often one terminal) from several threads.
_CONSOLE_LOCK = threading.Lock()


def _final(line: bytes) -> bytes:
    """What a terminal shows of `line` after its carriage returns: the last non-empty redraw."""
    for segment in reversed(line.split(b"\r")):
        if segment:
            return segment
    return b""


class Lines:
    """Splits a byte stream into complete lines, each in its final state (see `_final`)."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, data: bytes) -> list[bytes]:
        """The lines `data` completes (without their newline)."""
        *lines, rest = (self._pending + data).split(b"\n")
        if b"\r" in rest:  # a bar redrawn many times: keep only what can still show
            rest = b"\r" + _final(rest) + (b"\r" if rest.endswith(b"\r") else b"")
        if len(rest) > _MAX_LINE_BYTES:
            lines.append(rest)
            rest = b""
        self._pending = rest
        return [_final(line) for line in lines]

    def end(self) -> list[bytes]:
        """The unfinished last line, if any (the stream has ended)."""
        rest, self._pending = self._pending, b""
        return [_final(rest)] if rest else []


def final_lines(data: bytes) -> list[bytes]:
    """The lines a rank log keeps of `data` (each in its final state); for tests and tools."""
    lines = Lines()
    return lines.feed(data) + lines.end()


class Console:
    """One of the launcher's own streams, written as bytes from the follower threads."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def fileno(self) -> int | None:
        """The stream's file descriptor, or None (replaced by a non-file object)."""
        try:
            return self.stream.fileno()
        except (AttributeError, OSError, ValueError):
            return None

    def write(self, data: bytes) -> None:
        """Write `data` unchanged; a closed console is ignored (the rank logs keep it)."""
        with _CONSOLE_LOCK:
            try:
                self.stream.flush()  # the launcher's own messages first
                buffer = getattr(self.stream, "buffer", None)
                if buffer is None:
                    self.stream.write(data.decode("utf-8", "replace"))
                else:
                    buffer.write(data)
                self.stream.flush()
            except (OSError, ValueError):  # console gone (closed pipe): the logs keep it
                pass


class RankLog:
    """rank<N>.log: complete lines from the rank's streams, appended under a lock."""

    def __init__(self, path: str, header: str) -> None:
        self._file: BinaryIO = open(path, "ab")  # noqa: SIM115
        self._lock = threading.Lock()
        self.write([header.encode()])

    def write(self, lines: list[bytes]) -> None:
        """Append `lines`, each with its newline."""
        if lines:
            with self._lock:
                if self._file.closed:  # a follower outlived close() (a blocked console)
                    return
                self._file.write(b"".join(line + b"\n" for line in lines))
                self._file.flush()

    def close(self) -> None:
        """Close the file; later writes are dropped."""
        with self._lock:
            self._file.close()


class Route:
    """Where one stream's bytes go: the rank log, and the console raw or as prefixed lines."""

    def __init__(self, log: RankLog, console: Console | None, prefix: bytes | None) -> None:
        self._log, self._log_lines = log, Lines()
        self._console, self._prefix = console, prefix
        self._console_lines = Lines() if console is not None and prefix is not None else None

    def __call__(self, data: bytes) -> None:
        """Pass on the bytes one read returned."""
        self._log.write(self._log_lines.feed(data))
        if self._console is None:
            return
        if self._console_lines is None:
            self._console.write(data)
        else:
            self._show(self._console_lines.feed(data))

    def end(self) -> None:
        """The stream has ended: write out its unfinished last line."""
        self._log.write(self._log_lines.end())
        if self._console_lines is not None:
            self._show(self._console_lines.end())

    def _show(self, lines: list[bytes]) -> None:
        if lines and self._console is not None:
            self._console.write(b"".join(self._prefix + line + b"\n" for line in lines))


class Follower:
    """A thread copying worker output to routes until `stop`; stops after a last full read."""

    def __init__(self, name: str) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> Follower:
        """Start copying; returns self."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ask for a last full read, then the end (the workers are gone)."""
        self._stop.set()

    def join(self) -> None:
        """Wait for the follower's end (at most `_JOIN_SECONDS`)."""
        self._thread.join(_JOIN_SECONDS)

    def _run(self) -> None:
        raise NotImplementedError


class FileFollower(Follower):
    """Follows a rank's redirect files as they grow (a worker never blocks on them)."""

    def __init__(self, name: str, files: list[tuple[str, Route]]) -> None:
        super().__init__(name)
        self._files = files

    def _run(self) -> None:
        handles: dict[str, BinaryIO] = {}
        try:
            while True:
                stopping = self._stop.is_set()  # read before the pass: nothing is missed
                moved = False
                for path, route in self._files:
                    if path not in handles and os.path.exists(path):
                        handles[path] = open(path, "rb")  # noqa: SIM115
                    while path in handles and (data := handles[path].read(_READ_BYTES)):
                        route(data)
                        moved = True
                if stopping:
                    break
                if not moved:
                    self._stop.wait(_POLL_SECONDS)
        finally:
            for _, route in self._files:
                route.end()
            for handle in handles.values():
                handle.close()


class Channel:
    """A live stream: the path the agent opens as the worker's stdout/stderr, our read end,
    and a write end we hold ourselves, so the reader sees no end of file before the worker
    has opened the path (and no busy end-of-file polling while it runs)."""

    def __init__(self, path: str, read_fd: int, hold_fd: int, fifo: bool) -> None:
        self.path, self.read_fd, self.hold_fd, self._fifo = path, read_fd, hold_fd, fifo

    def release(self) -> None:
        """Close our own write end: the reader sees the end once the workers' are closed."""
        if self.hold_fd >= 0:
            os.close(self.hold_fd)
            self.hold_fd = -1

    def close(self) -> None:
        """Close both ends; remove the FIFO."""
        self.release()
        os.close(self.read_fd)
        if self._fifo:
            try:
                os.unlink(self.path)
            except OSError:
                pass


def _open_pty(console_fd: int) -> Channel:
    import fcntl
    import termios

    master, slave = os.openpty()
    attrs = termios.tcgetattr(slave)
    attrs[1] &= ~termios.OPOST  # bytes pass unchanged ("\n" stays "\n"; the console's own
    termios.tcsetattr(slave, termios.TCSANOW, attrs)  # terminal translates it)
    try:
        size = fcntl.ioctl(console_fd, termios.TIOCGWINSZ, b"\0" * 8)
        fcntl.ioctl(slave, termios.TIOCSWINSZ, size)
    except OSError:  # no size to copy: the pty keeps 0x0, tools fall back to 80 columns
        pass
    os.set_blocking(master, False)
    return Channel(os.ttyname(slave), master, slave, fifo=False)


def _open_fifo(path: str) -> Channel:
    if os.path.exists(path):
        os.unlink(path)
    os.mkfifo(path, 0o600)
    read_fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    return Channel(path, read_fd, os.open(path, os.O_WRONLY | os.O_NONBLOCK), fifo=True)


def _can_open_terminals() -> bool:
    """False for a session leader without a controlling terminal (see the module doc)."""
    if os.getsid(0) != os.getpid():
        return True
    try:
        os.close(os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY))
    except OSError:
        return False
    return True


def open_channel(console: Console, fifo_path: str) -> Channel | None:
    """A pty if `console` is a terminal (and one may be opened), else a FIFO; None if neither."""
    fd = console.fileno()
    try:
        if fd is not None and os.isatty(fd) and _can_open_terminals():
            return _open_pty(fd)
        return _open_fifo(fifo_path)
    except (OSError, ImportError, AttributeError):  # no ptys/FIFOs here: files, as for others
        return None


class ChannelReader(Follower):
    """Copies a live channel to its route as soon as bytes arrive."""

    def __init__(self, name: str, channel: Channel, route: Route) -> None:
        super().__init__(name)
        self._channel, self._route = channel, route

    def _run(self) -> None:
        fd = self._channel.read_fd
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        try:
            while not self._stop.is_set():
                if poller.poll(_POLL_SECONDS * 1000):
                    self._read_available(fd)
            # The workers are gone; what they wrote is still buffered (a pty hands it over
            # asynchronously): read until the channel stays quiet, then the rest.
            deadline = time.monotonic() + _DRAIN_SECONDS
            while poller.poll(_POLL_SECONDS * 1000) and time.monotonic() < deadline:
                self._read_available(fd)
            self._channel.release()
            self._read_available(fd)
        finally:
            self._route.end()
            self._channel.close()

    def _read_available(self, fd: int) -> None:
        while True:
            try:
                data = os.read(fd, _READ_BYTES)
            except BlockingIOError:
                return
            except OSError as exc:  # EIO: a pty whose every writer has closed it
                if exc.errno != errno.EIO:
                    raise
                return
            if not data:
                return
            self._route(data)


def same_destination(first: Console, second: Console) -> bool:
    """Whether the two launcher streams end up in one place (a terminal, a file, a pipe)."""
    fds = (first.fileno(), second.fileno())
    if None in fds:
        return False
    try:
        a, b = (os.fstat(fd) for fd in fds)  # type: ignore[arg-type]
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
