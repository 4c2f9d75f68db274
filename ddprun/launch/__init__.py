"""ddprun's launcher: ``ddprun`` / ``python -m ddprun`` on top of torch's elastic agent.

- `cli`: arguments and DDPRUN_* twins -> one `LaunchSettings` (no torch import).
- `agent`: `elastic_launch` with every `LaunchConfig` field set; per-rank logs; signals; the
  one failure summary.
- `worker`: what each worker runs first (parent-death signal, OMP threads, error file, exit).
- `cluster`: SLURM detection.

Nothing here imports `ddprun.core`, `ddprun.engines` or `ddprun.callbacks`: workers run the
user's script, and the script imports `ddprun.dl` itself.
"""

from __future__ import annotations

__all__ = ["main"]


def main() -> int:
    """Run the ``ddprun`` command line (see `ddprun.launch.cli.main`)."""
    from ddprun.launch.cli import main as cli_main

    return cli_main()
