"""Spawn mode: under plain ``python script.py``, start N workers, wait for them, report.

A launcher, not a strategy: each worker gets the environment a launcher would give it (RANK,
WORLD_SIZE, MASTER_ADDR, ...) and runs the whole experiment; the engine it runs (the DDP
engine) then joins the group like under ``ddprun`` or ``torchrun``. The parent raises once,
naming the first failing rank, or adopts rank 0's trained weights and final metrics.
"""

from __future__ import annotations

import os
import pickle
import sys
import tempfile
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ddprun import distributed
from ddprun.checkpoint import unwrap_module
from ddprun.engines.engine import map_components

if TYPE_CHECKING:
    from ddprun.core.runner import IRunner


def spawn_world_size(requested: int | None) -> int:
    """Workers to start: `requested`, else one per visible GPU, else 2 (announced)."""
    if requested is not None:
        return requested
    world_size = torch.cuda.device_count() or 2
    print(
        f"[ddprun] spawning {world_size} worker processes "
        f"({'one per GPU' if torch.cuda.is_available() else 'CPU, gloo'})",
        flush=True,
    )
    return world_size


def run_spawned(runner: IRunner, world_size: int | None, address: str, port: int | None) -> None:
    """Run ``runner.run()`` in `world_size` spawned workers; rank 0's model comes back.

    The parent waits, raises if a worker failed (naming its rank), and otherwise loads rank
    0's trained weights and final metrics into `runner`.

    Raises:
        RuntimeError: called inside a spawned worker (an unguarded script), or a worker failed.
    """
    import torch.multiprocessing as mp

    _refuse_nested_spawn()
    world_size = spawn_world_size(world_size)
    port = port or distributed.find_free_port(address)
    with tempfile.TemporaryDirectory(prefix="ddprun-spawn-") as folder:
        # Plain pickle copies tensor data. torch.multiprocessing would instead hand every
        # worker the *same* shared-memory storage, so N ranks would step one set of weights.
        args = (pickle.dumps(runner), world_size, address, port, folder)
        try:
            mp.start_processes(
                _spawned_worker, args=args, nprocs=world_size, join=True, start_method="spawn"
            )
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as error:
            raise RuntimeError(_failure_summary(Path(folder), error)) from None
        _adopt_rank0_result(runner, torch.load(Path(folder) / "rank0.pt", weights_only=False))


def _refuse_nested_spawn() -> None:
    import multiprocessing

    if multiprocessing.parent_process() is not None:
        raise RuntimeError(
            "ddprun: a DDP run was started while a spawned worker imported your script. "
            'Guard the entry point with `if __name__ == "__main__":` so that workers '
            "import the script without running it."
        )


def _spawned_worker(
    local_rank: int, payload: bytes, world_size: int, address: str, port: int, folder: str
) -> None:
    """Entry of each spawned worker: the launcher environment, then the whole experiment.

    The worker exits like a Python program (``ddprun.process_exit``): the user's `atexit`
    handlers run and open files are flushed, on failure too, and the process group is torn
    down without racing gloo's threads; a failure is written to ``rank<N>.error`` in `folder`
    for the parent to report once.
    """
    from ddprun import process_exit

    os.environ.update(
        {
            "RANK": str(local_rank),
            "LOCAL_RANK": str(local_rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": address,
            "MASTER_PORT": str(port),
        }
    )
    distributed.set_parent_death_signal()
    process_exit.arm()
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    status = 0
    try:
        runner = pickle.loads(payload)
        runner.run()
        if local_rank == 0:
            torch.save(_rank0_result(runner), Path(folder) / "rank0.pt")
    except SystemExit as stop:  # RunStopped (a stop signal, after saving): not a failure report
        status = stop.code if isinstance(stop.code, int) else 1
    except BaseException:
        message = traceback.format_exc()
        Path(folder, f"rank{local_rank}.error").write_text(message)
        print(message, file=sys.stderr, flush=True)
        status = 1
    process_exit.leave(status)


def _failure_summary(folder: Path, error: Exception) -> str:
    """One message naming the first failing rank and its traceback (not N tracebacks)."""
    reports = sorted(folder.glob("rank*.error"), key=lambda p: p.stat().st_mtime)
    if not reports:
        return f"DDP worker failed: {error}"
    first = reports[0]
    rank = first.stem.removeprefix("rank")
    return f"DDP worker rank {rank} failed:\n{first.read_text().rstrip()}"


def _rank0_result(runner: IRunner) -> dict[str, Any]:
    # plain module states (no `module.`/`_orig_mod.` prefix): they load into the parent's
    # model whether or not it is compiled
    model = map_components(runner.model, unwrap_module)
    states = map_components(model, lambda m: {k: v.cpu() for k, v in m.state_dict().items()})
    keep = (
        "global_epoch_step",
        "global_batch_step",
        "global_sample_step",
        "stage_key",
        "stage_epoch_step",
        "epoch_metrics",
        "loader_metrics",
    )
    return {"model": states, **{name: getattr(runner, name) for name in keep}}


def _adopt_rank0_result(runner: IRunner, result: dict[str, Any]) -> None:
    states = result.pop("model")
    model = runner.model if runner.model is not None else runner.get_model(result["stage_key"])
    if isinstance(model, Mapping):
        for key, module in model.items():
            unwrap_module(module).load_state_dict(states[key])
    else:
        unwrap_module(model).load_state_dict(states)
    runner.model = model
    for name, value in result.items():
        setattr(runner, name, value)
