"""Cluster detection: what the scheduler already says about nodes, node rank and master address.

Only SLURM is detected today. `detect_cluster` returns None outside a scheduler, so the caller
falls back to one local node. Explicit flags and DDPRUN_* variables always win over what is
detected here; this module only supplies defaults.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["ClusterInfo", "ClusterError", "detect_cluster", "expand_nodelist", "first_host"]

# SLURM master ports are derived from the job id so that every node computes the same one
# without talking to the others; the range stays clear of the ephemeral ports (32768+).
_SLURM_PORT_BASE = 15000
_SLURM_PORT_SPAN = 10000

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


class ClusterError(ValueError):
    """The scheduler's variables are inconsistent or cannot be parsed."""


@dataclass(frozen=True)
class ClusterInfo:
    """What a scheduler told us about this job.

    Attributes:
        scheduler: name of the scheduler ("slurm").
        nnodes: number of nodes in the job (step).
        node_rank: this node's index, 0-based.
        master_addr: host that runs rank 0's rendezvous store (first host of the node list).
        master_port: port every node agrees on without communication.
        job_id: the scheduler's job id, used as the rendezvous id.
    """

    scheduler: str
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int
    job_id: str


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets: "a[1,2],b" -> ["a[1,2]", "b"]."""
    parts, depth, start = [], 0, 0
    for index, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ClusterError(f"unbalanced ']' in node list {text!r}")
        elif char == "," and depth == 0:
            parts.append(text[start:index])
            start = index + 1
    if depth != 0:
        raise ClusterError(f"unbalanced '[' in node list {text!r}")
    parts.append(text[start:])
    return [part.strip() for part in parts if part.strip()]


def _expand_ranges(spec: str, nodelist: str) -> list[str]:
    """Expand the inside of one bracket: "01-03,07" -> ["01", "02", "03", "07"]."""
    values: list[str] = []
    for item in spec.split(","):
        match = _RANGE.match(item.strip())
        if not match:
            raise ClusterError(f"bad range {item!r} in node list {nodelist!r}")
        low, high = match.group(1), match.group(2) or match.group(1)
        if int(high) < int(low):
            raise ClusterError(f"descending range {item!r} in node list {nodelist!r}")
        # SLURM keeps the zero padding of the lower bound: node[001-010] -> node001..node010.
        width = len(low)
        values.extend(str(number).zfill(width) for number in range(int(low), int(high) + 1))
    return values


def _expand_host_pattern(pattern: str, nodelist: str) -> list[str]:
    """Expand one host pattern, which may hold several bracket groups: "r[1-2]n[1-2]"."""
    bracket = pattern.find("[")
    if bracket < 0:
        if "]" in pattern:
            raise ClusterError(f"unbalanced ']' in node list {nodelist!r}")
        return [pattern]
    close = pattern.find("]", bracket)
    if close < 0:
        raise ClusterError(f"unbalanced '[' in node list {nodelist!r}")
    prefix, spec, rest = pattern[:bracket], pattern[bracket + 1 : close], pattern[close + 1 :]
    tails = _expand_host_pattern(rest, nodelist)
    return [prefix + value + tail for value in _expand_ranges(spec, nodelist) for tail in tails]


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand SLURM's compressed host list into host names, in order.

    Args:
        nodelist: e.g. "node[01-04,07]", "a[1-2],b3", "gpu-[001-003]-ib" or "host".

    Returns:
        The host names, e.g. ["node01", "node02", "node03", "node04", "node07"].

    Raises:
        ClusterError: if the list is empty or malformed.
    """
    hosts = [
        host
        for pattern in _split_top_level(nodelist.strip())
        for host in _expand_host_pattern(pattern, nodelist)
    ]
    if not hosts:
        raise ClusterError(f"empty node list {nodelist!r}")
    return hosts


def first_host(nodelist: str) -> str:
    """Return the first host of a SLURM node list (the node that hosts rank 0)."""
    first_pattern = _split_top_level(nodelist.strip())
    if not first_pattern:
        raise ClusterError(f"empty node list {nodelist!r}")
    # Only the first pattern needs expanding, even for a list of thousands of nodes.
    return _expand_host_pattern(first_pattern[0], nodelist)[0]


def _first_of(env: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        value = env.get(name)
        if value:
            return value
    return None


def _as_int(env: Mapping[str, str], name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ClusterError(f"{name}={value!r} is not an integer") from None


def _slurm_port(job_id: str) -> int:
    digits = "".join(char for char in job_id if char.isdigit()) or "0"
    return _SLURM_PORT_BASE + int(digits[-4:]) % _SLURM_PORT_SPAN


def _detect_slurm(env: Mapping[str, str]) -> ClusterInfo | None:
    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    nodelist = _first_of(env, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    if not job_id or not nodelist:
        return None
    nnodes_text = _first_of(env, "SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES")
    nnodes = _as_int(env, "SLURM_NNODES", nnodes_text) if nnodes_text else None
    if nnodes is None:
        nnodes = len(expand_nodelist(nodelist))
    node_rank = _as_int(env, "SLURM_NODEID", env.get("SLURM_NODEID", "0"))
    if not 0 <= node_rank < nnodes:
        raise ClusterError(f"SLURM_NODEID={node_rank} is outside 0..{nnodes - 1}")
    _check_one_task_per_node(env, nnodes)
    return ClusterInfo(
        "slurm", nnodes, node_rank, first_host(nodelist), _slurm_port(job_id), job_id
    )


def _check_one_task_per_node(env: Mapping[str, str], nnodes: int) -> None:
    """Inside an srun step, ddprun must run once per node: it starts the node's workers itself."""
    if not (env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID")):
        return  # batch script or salloc shell: no task layout to check
    ntasks_text = _first_of(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
    if ntasks_text and _as_int(env, "SLURM_NTASKS", ntasks_text) > nnodes:
        raise ClusterError(
            f"SLURM step has {ntasks_text} tasks on {nnodes} node(s); run one ddprun per node "
            "(srun --ntasks-per-node=1 ddprun ...)"
        )


def detect_cluster(env: Mapping[str, str]) -> ClusterInfo | None:
    """Detect a scheduler from environment variables.

    Args:
        env: the environment to read (os.environ in production, a dict in tests).

    Returns:
        What the scheduler says about this job, or None outside a known scheduler.

    Raises:
        ClusterError: the scheduler's variables are present but malformed or inconsistent.
    """
    return _detect_slurm(env)
