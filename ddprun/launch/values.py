"""The parsers of the launcher's option values: (text, source) -> value, or a `UsageError`.

`source` is where the value came from: the flag as the user spelled it, or its ``DDPRUN_*``
twin, so each error names it and says what was expected, in one line. `StreamSpec` is
torchrun's Std value (``--tee``/``--redirects``); `join_host_port` and `endpoint_port` build
and read the HOST:PORT strings the parsers accept. `flags` and `cli` parse ddprun's arguments
with these, `doctor` its own. Nothing here imports torch.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ENV_PREFIX",
    "StreamSpec",
    "UsageError",
    "endpoint_port",
    "is_stream_spec",
    "join_host_port",
    "nonnegative",
    "parse_backend",
    "parse_bool",
    "parse_choice",
    "parse_endpoint",
    "parse_int",
    "parse_nnodes",
    "parse_nproc",
    "parse_port",
    "parse_ranks",
    "parse_rdzv_conf",
    "parse_run_id",
    "parse_streams",
    "parse_text",
    "positive",
    "positive_seconds",
]

#: Prefix of the flags' environment twins (``--nproc`` <-> ``DDPRUN_NPROC``).
ENV_PREFIX = "DDPRUN_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_RUN_ID = re.compile(r"^[A-Za-z0-9_.\-]+$")
# torchrun's Std values: one code for every local rank, or "local_rank:code" pairs.
_STD_VALUE = re.compile(r"^[0-3]$")
_STD_MAP = re.compile(r"^\d+:[0-3](,\d+:[0-3])*$")
#: rdzv-conf keys torch's c10d rendezvous reads as integers (seconds or counts).
_INT_CONF_KEYS = frozenset(
    "timeout join_timeout last_call_timeout close_timeout heartbeat_timeout read_timeout "
    "keep_alive_interval keep_alive_max_attempt".split()
)


class UsageError(ValueError):
    """An invalid argument; the message is the one line shown to the user."""


def parse_bool(text: str, source: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE or lowered in _FALSE:
        return lowered in _TRUE
    raise UsageError(f"{source} must be 1/0/true/false, got {text!r}")


def parse_int(text: Any, source: str, low: int, high: int | None, expected: str) -> int:
    try:
        number = int(str(text).strip())
    except ValueError:
        raise UsageError(f"{source} must be {expected}, got {text!r}") from None
    if number < low or (high is not None and number > high):
        raise UsageError(f"{source} must be {expected}, got {text!r}")
    return number


def nonnegative(text: str, source: str) -> int:
    return parse_int(text, source, 0, None, "an integer >= 0")


def positive(text: str, source: str) -> int:
    return parse_int(text, source, 1, None, "an integer >= 1")


def positive_seconds(text: str, source: str) -> float:
    try:
        seconds = float(str(text).strip())
    except ValueError:
        seconds = -1.0
    if not seconds > 0 or seconds == float("inf"):
        raise UsageError(f"{source} must be a number of seconds > 0, got {text!r}")
    return seconds


def parse_nproc(text: str, source: str) -> int | str:
    """A positive count, or torchrun's words auto/cpu/gpu (resolved by the caller)."""
    word = str(text).strip().lower()
    if word in ("auto", "cpu", "gpu"):
        return word
    return parse_int(text, source, 1, None, "a positive integer, 'auto', 'cpu' or 'gpu'")


def parse_nnodes(text: str, source: str) -> tuple[int, int]:
    expected = "N or MIN:MAX with 1 <= MIN <= MAX"
    parts = str(text).split(":")
    if len(parts) > 2:
        raise UsageError(f"{source} must be {expected}, got {text!r}")
    low = parse_int(parts[0], source, 1, None, expected)
    high = parse_int(parts[-1], source, 1, None, expected)
    if low > high:
        raise UsageError(f"{source} must be {expected}, got {text!r}")
    return low, high


def parse_port(text: str, source: str) -> int:
    return parse_int(text, source, 1, 65535, "a port number in 1..65535")


def parse_endpoint(text: str, source: str) -> str:
    """HOST:PORT (IPv6 as [::1]:PORT); port 0 asks for a free port (one node only)."""
    host, _, port = str(text).rpartition(":")
    if not host.strip("[]") or not port:
        raise UsageError(f"{source} must be HOST:PORT, got {text!r}")
    parse_int(port, source, 0, 65535, "HOST:PORT with a port in 0..65535 (0: a free one)")
    return str(text)


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def endpoint_port(endpoint: str) -> int:
    return int(endpoint.rpartition(":")[2])


def parse_backend(text: str, source: str) -> str:
    if text not in ("gloo", "nccl"):
        raise UsageError(f"{source} must be 'gloo' or 'nccl', got {text!r}")
    return text


def parse_choice(choices: Sequence[str]) -> Any:
    def parse(text: str, source: str) -> str:
        if text not in choices:
            names = ", ".join(repr(choice) for choice in choices)
            raise UsageError(f"{source} must be one of {names}, got {text!r}")
        return text

    return parse


def parse_run_id(text: str, source: str) -> str:
    if not _RUN_ID.match(text):
        raise UsageError(f"{source} must be letters, digits, '.', '_' or '-', got {text!r}")
    return text


def parse_text(text: str, source: str) -> str:
    if not str(text).strip():
        raise UsageError(f"{source} must not be empty")
    return str(text).strip()


def parse_rdzv_conf(text: str, source: str) -> dict[str, str]:
    """torchrun's KEY=VALUE,... rendezvous settings; integer keys are checked here."""
    conf: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in str(text).split(","))):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not key or not sep or not value:
            raise UsageError(f"{source} must be KEY=VALUE[,KEY=VALUE...], got {text!r}")
        if key in _INT_CONF_KEYS:
            parse_int(value, f"{source} {key}", 1, None, "an integer >= 1")
        if key == "is_host":
            parse_bool(value, f"{source} is_host")
        conf[key] = value
    return conf


def parse_ranks(text: str, source: str) -> tuple[int, ...]:
    expected = "comma-separated local ranks like 0,1"
    parts = [part.strip() for part in str(text).split(",")]
    if not all(part.isdigit() for part in parts):
        raise UsageError(f"{source} must be {expected}, got {text!r}")
    return tuple(sorted({int(part) for part in parts}))


def is_stream_spec(text: str) -> bool:
    return bool(_STD_VALUE.match(text) or _STD_MAP.match(text))


@dataclass(frozen=True)
class StreamSpec:
    """torchrun's Std value for --redirects/--tee: 0 none, 1 stdout, 2 stderr, 3 both, for
    every local rank (`default`) or per local rank (`per_rank`; ranks not listed: 0)."""

    default: int = 0
    per_rank: tuple[tuple[int, int], ...] = ()

    def of(self, local_rank: int) -> int:
        """The streams (bit 1 stdout, bit 2 stderr) chosen for `local_rank`."""
        return dict(self.per_rank).get(local_rank, self.default)

    def __bool__(self) -> bool:
        return bool(self.default) or any(code for _, code in self.per_rank)


def parse_streams(text: Any, source: str) -> StreamSpec:
    """0-3 or ``local_rank:code,...``; the twin may also say true/false (3/0)."""
    value = str(text).strip()
    if source.startswith(ENV_PREFIX) and not value.isdigit() and ":" not in value:
        value = "3" if parse_bool(value, source) else "0"
    if _STD_VALUE.match(value):
        return StreamSpec(int(value))
    if _STD_MAP.match(value):
        pairs = (item.split(":") for item in value.split(","))
        return StreamSpec(0, tuple(sorted((int(rank), int(code)) for rank, code in pairs)))
    raise UsageError(
        f"{source} must be 0-3 (0 none, 1 stdout, 2 stderr, 3 both) or per local rank like "
        f"0:3,1:1, got {text!r}"
    )
