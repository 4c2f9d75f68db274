"""ddprun's launcher: ``ddprun`` / ``python -m ddprun`` on top of torch's elastic agent.

- `cli`: arguments and DDPRUN_* twins -> one `LaunchSettings` (no torch import), with
  `flags` (the flag table, torchrun's spellings), `values` (the value parsers) and `settings`
  (`LaunchSettings` itself).
- `agent`: `elastic_launch` with every `LaunchConfig` field set; signals; leftover workers.
- `rendezvous`: ddprun's c10d rendezvous backend (fresh worker store, fixed node ranks).
- `console` + `streams`: per-rank log files and the rank-0 console mirror.
- `failures`: the one failure summary (which rank failed first, and why).
- `worker`: what each worker runs first (parent-death signal, OMP threads, error file, exit).
- `cluster`: SLURM detection; `doctor` (+ `doctor_allreduce`): the preflight check.

Nothing here imports `ddprun.core`, `ddprun.engines` or `ddprun.callbacks`: workers run the
user's script, and the script imports `ddprun.dl` itself.
"""

from __future__ import annotations

__all__ = ["main"]


def main() -> int:
    """Run the ``ddprun`` command line (see `ddprun.launch.cli.main`)."""
    from ddprun.launch.cli import main as cli_main

    return cli_main()
