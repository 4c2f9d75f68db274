"""ddprun's rendezvous backend: torch's c10d rendezvous wrapped so restarts and node ranks work.

`FreshWorkerStoreRendezvous` wraps the c10d handler (see its docstring for what it changes and
why); `register_rendezvous` makes it torch's ``ddprun-c10d`` backend, which every launch asks
for (`LaunchSettings.rendezvous`); `error_hint` says what a failed rendezvous most likely
means. The backend name and the node-rank config key are shared with the settings and live
in `settings.py`, which must stay free of torch.
"""

from __future__ import annotations

import json
import os

from torch.distributed.elastic.rendezvous import (
    RendezvousConnectionError,
    RendezvousError,
    RendezvousHandler,
    RendezvousInfo,
    RendezvousParameters,
    RendezvousTimeoutError,
    rendezvous_handler_registry,
)

from ddprun.launch.settings import NODE_RANK_CONFIG, RDZV_BACKEND, LaunchSettings

__all__ = ["RESTART_COUNT_ENV", "FreshWorkerStoreRendezvous", "error_hint", "register_rendezvous"]

#: The job-wide restart count every worker sees (see `FreshWorkerStoreRendezvous`).
RESTART_COUNT_ENV = "DDPRUN_RESTART_COUNT"


class FreshWorkerStoreRendezvous(RendezvousHandler):
    """torch's c10d rendezvous, except that every round gives the workers a new store and
    nodes with a fixed node rank get it as their group rank.

    Since torch 2.5 the c10d handler hosts the workers' TCPStore in the agent and, in torch
    2.13, creates it once and hands the same server to every round. Workers do not prefix
    their keys per attempt, so after a restart a rank can read a peer's address from the
    failed attempt: gloo then fails with "connectFullMesh ... Connection refused" (NCCL gets
    a stale unique id; pytorch/pytorch#135712, #167288). Dropping the cached server before
    each round makes rank 0's agent bind a new one on port 0, as torch intended (PR #135957),
    so keys never leak between attempts and no port is ever probed. The rendezvous store
    itself (127.0.0.1:0 or the endpoint) is created once and kept for the whole run.

    Every round the nodes also publish, in the round's store, their node rank (when fixed)
    and how many rounds they joined before; this is where two things are settled:

    - Group ranks. torch's c10d rendezvous ranks the nodes by (host name, agent pid), not by
      ``--node-rank``: on one machine the launcher started first becomes group 0, on a cluster
      the alphabetically first host. With `node_rank` set (a fixed-size job whose node rank
      was given, or SLURM's), each node takes it as its group rank, so GROUP_RANK == node rank
      and node 0's first worker is global rank 0 (the one that writes logs and checkpoints).
      Two nodes claiming one rank fail the launch with a clear message.
    - The job's restart count. Each agent counts only its own restarts, so a node that joins
      a job that already ran (a replaced node, an elastic scale-up) would start its workers
      with TORCHELASTIC_RESTART_COUNT=0 while the others resume from last.pth. The largest
      count of earlier rounds over all nodes is exported as DDPRUN_RESTART_COUNT; the worker
      wrapper raises TORCHELASTIC_RESTART_COUNT to it, so every rank agrees on resuming.
    """

    # Private attributes of torch's DynamicRendezvousHandler; absent in other versions, in
    # which case torch's own behaviour is kept.
    _CACHED = ("_shared_tcp_store_server", "_bootstrap_store_info")
    _NODE_KEY = "ddprun/node/"

    def __init__(self, inner: RendezvousHandler, node_rank: int | None = None) -> None:
        self._inner = inner
        self._node_rank = node_rank
        self._rounds = 0  # rounds this node completed before the current one

    @property
    def use_agent_store(self) -> bool:
        return self._inner.use_agent_store

    def next_rendezvous(self) -> RendezvousInfo:
        for name in self._CACHED:
            if hasattr(self._inner, name):
                setattr(self._inner, name, None)
        info = self._agree(self._inner.next_rendezvous())
        self._rounds += 1
        return info

    def _agree(self, info: RendezvousInfo) -> RendezvousInfo:
        """Exchange (node rank, earlier rounds) with the round's other nodes; apply both."""
        store, world_size = info.store, info.world_size
        store.set(f"{self._NODE_KEY}{info.rank}", json.dumps([self._node_rank, self._rounds]))
        nodes = [json.loads(store.get(f"{self._NODE_KEY}{rank}")) for rank in range(world_size)]
        os.environ[RESTART_COUNT_ENV] = str(max(rounds for _, rounds in nodes))
        if self._node_rank is None:
            return info
        claimed = [node_rank for node_rank, _ in nodes]
        if None in claimed or sorted(claimed) != list(range(world_size)):
            raise RendezvousError(
                f"the {world_size} nodes gave node ranks {claimed}; each node needs its own "
                f"--node-rank in 0..{world_size - 1}"
            )
        return RendezvousInfo(store, self._node_rank, world_size, info.bootstrap_store_info)

    def get_backend(self) -> str:
        return RDZV_BACKEND

    def get_run_id(self) -> str:
        return self._inner.get_run_id()

    def is_closed(self) -> bool:
        return self._inner.is_closed()

    def set_closed(self) -> None:
        self._inner.set_closed()

    def num_nodes_waiting(self) -> int:
        return self._inner.num_nodes_waiting()

    def shutdown(self) -> bool:
        return self._inner.shutdown()


def _create_rendezvous(params: RendezvousParameters) -> RendezvousHandler:
    config = dict(params.config)
    node_rank = config.pop(NODE_RANK_CONFIG, None)
    c10d = RendezvousParameters(
        "c10d", params.endpoint, params.run_id, params.min_nodes, params.max_nodes,
        params.local_addr, **config,
    )  # fmt: skip
    inner = rendezvous_handler_registry.create_handler(c10d)
    return FreshWorkerStoreRendezvous(inner, None if node_rank is None else int(node_rank))


def register_rendezvous() -> None:
    """Register ddprun's backend name; registering the same creator again is a no-op."""
    rendezvous_handler_registry.register(RDZV_BACKEND, _create_rendezvous)


def error_hint(error: Exception, settings: LaunchSettings) -> str:
    """What a rendezvous error most likely means for a multi-node job."""
    if settings.is_single_node:
        return ""
    endpoint = settings.rendezvous().endpoint
    if isinstance(error, RendezvousTimeoutError):
        return (
            f" (fewer than {settings.min_nodes} nodes joined {endpoint} within "
            f"{settings.rdzv_timeout} s; see --rdzv-timeout)"
        )
    if isinstance(error, RendezvousConnectionError) and settings.rendezvous().configs.get(
        "is_host"
    ):
        return f" (could not host the rendezvous store on {endpoint}: port taken, or two node 0s?)"
    if isinstance(error, RendezvousConnectionError):
        return f" (the rendezvous store at {endpoint} is unreachable: is node 0's launcher up?)"
    return ""
