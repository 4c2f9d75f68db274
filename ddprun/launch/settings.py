"""One launch's settings: `LaunchSettings`, and how its node meets the others (`Rendezvous`).

`cli.build_settings` fills a `LaunchSettings` from the command line, its DDPRUN_* twins and
the cluster; `agent.launch` runs it. The settings answer the questions both sides ask: which
streams of a rank reach the console, and where and how the rendezvous happens. The two
constants below are what `rendezvous.py` (torch's side) reads back from these settings; they
live here because this module, like `cli.py`, must not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ddprun.launch.values import StreamSpec, join_host_port

__all__ = ["NODE_RANK_CONFIG", "RDZV_BACKEND", "LaunchSettings", "Rendezvous"]

#: ddprun's rendezvous backend: torch's c10d with a fresh worker store per round (rendezvous.py).
RDZV_BACKEND = "ddprun-c10d"
#: rdzv_configs key carrying this node's fixed rank to ddprun's rendezvous (rendezvous.py).
NODE_RANK_CONFIG = "ddprun_node_rank"


@dataclass(frozen=True)
class Rendezvous:
    """How this node's agent meets the others (torch rendezvous parameters)."""

    backend: str
    endpoint: str
    configs: dict[str, Any]
    local_addr: str | None


@dataclass(frozen=True)
class LaunchSettings:
    """Every setting of one launch. These defaults are ddprun's only defaults.

    `build_settings` returns an instance with everything resolved: `nproc` is an int,
    `run_id` and `logdir` are filled in.
    """

    entrypoint: str = ""  # the script's path, or the module's name with is_module
    is_module: bool = False
    script_args: tuple[str, ...] = ()
    nproc: int | str = "auto"  # or "cpu" / "gpu" (torchrun's words); an int once resolved
    min_nodes: int = 1
    max_nodes: int = 1
    node_rank: int = 0
    node_rank_given: bool = False  # from --node-rank, its twin or the scheduler
    master_addr: str = "127.0.0.1"
    master_port: int | None = None  # None on one node: the store binds a free port itself
    rdzv_endpoint: str | None = None
    rdzv_backend: str | None = None  # c10d/static as asked; None: keep a given node rank
    rdzv_conf: tuple[tuple[str, str], ...] = ()  # --rdzv-conf, passed to the rendezvous
    local_addr: str | None = None  # this node's address (workers' MASTER_ADDR on node 0)
    run_id: str = ""  # rendezvous id; "" = generated (one node) or SLURM job id
    max_restarts: int = 0
    logdir: str = ""  # "" = ./ddprun_logs/<run id>
    tee: StreamSpec = StreamSpec()  # ranks/streams also on the console, prefixed
    redirects: StreamSpec = StreamSpec()  # streams taken off the console (files keep them)
    local_ranks_filter: tuple[int, ...] | None = None  # console: only these local ranks
    no_python: bool = False  # run the entrypoint as a program, without the worker wrapper
    backend: str | None = None  # exported to workers as DDPRUN_BACKEND
    shutdown_timeout: int = 30  # seconds between forwarding SIGTERM and SIGKILL
    monitor_interval: float = 0.1
    rdzv_timeout: int = 900  # seconds to wait for the nodes to join a round (each restart too)
    start_method: str = "spawn"
    role: str = "default"
    signals_to_handle: str = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"  # forwarded to workers
    default_master_port: int = 29500  # multi-node rendezvous port when none is given

    @property
    def is_single_node(self) -> bool:
        return self.max_nodes == 1

    @property
    def fixed_node_rank(self) -> int | None:
        """The group rank this node must get, or None when the rendezvous may choose.

        A fixed-size multi-node job whose node rank was given (or taken from SLURM) keeps it:
        GROUP_RANK == node rank, so node 0's local rank 0 is global rank 0. Elastic jobs
        (MIN:MAX) and jobs without a node rank let the rendezvous order the nodes.
        With ``--rdzv-backend static`` the node rank (default 0) is always kept; with
        ``c10d`` the rendezvous always orders the nodes (torchrun ignores --node-rank there).
        """
        if self.rdzv_backend == "c10d":
            return None
        given = self.node_rank_given or self.rdzv_backend == "static"
        fixed = given and self.min_nodes == self.max_nodes > 1
        return self.node_rank if fixed else None

    def console_streams(self, rank: int, local_rank: int) -> tuple[bool, bool]:
        """Whether this worker's (stdout, stderr) reach the launcher's console.

        Rank 0's streams do unless redirected (``-r``); another rank's only when tee'd
        (``-t``); a tee'd stream shows even if redirected (torchrun: tee = redirect + console).
        ``--local-ranks-filter`` then keeps only the listed local ranks. Every rank's streams
        always reach its rank<N>.log.
        """
        if self.local_ranks_filter is not None and local_rank not in self.local_ranks_filter:
            return False, False
        shown = ((3 if rank == 0 else 0) & ~self.redirects.of(local_rank)) | self.tee.of(local_rank)
        return bool(shown & 1), bool(shown & 2)

    def rendezvous(self) -> Rendezvous:
        """Where and how this node's agent meets the others (always torch's c10d rendezvous).

        One node with no port given: the agent's store binds 127.0.0.1:0, a free port chosen by
        the OS at bind time, so concurrent jobs never collide and restarts keep that store.
        Otherwise the store listens on the endpoint (--rdzv-endpoint, or master addr:port) and
        the node with node rank 0 hosts it; nodes keep their given node rank as group rank
        (`fixed_node_rank`), else the rendezvous orders them. ``--rdzv-conf`` settings are
        passed on and win over these; ``--local-addr`` is this node's address.
        """
        timeout = self.rdzv_timeout
        configs: dict[str, Any] = {
            "timeout": timeout,
            "join_timeout": timeout,
            **dict(self.rdzv_conf),
        }
        if self.fixed_node_rank is not None:
            configs[NODE_RANK_CONFIG] = self.fixed_node_rank
        if self.rdzv_endpoint:
            if self.is_single_node or self.rdzv_backend == "static":
                configs.setdefault("is_host", self.node_rank == 0)
            return Rendezvous(RDZV_BACKEND, self.rdzv_endpoint, configs, self.local_addr)
        if self.is_single_node and self.master_port is None:
            configs.setdefault("is_host", True)
            local_addr = self.local_addr or "127.0.0.1"
            return Rendezvous(RDZV_BACKEND, "127.0.0.1:0", configs, local_addr)
        port = self.master_port if self.master_port is not None else self.default_master_port
        endpoint = join_host_port(self.master_addr, port)
        configs.setdefault("is_host", self.node_rank == 0)
        return Rendezvous(RDZV_BACKEND, endpoint, configs, self.local_addr)
