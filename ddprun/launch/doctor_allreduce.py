"""The doctor's all-reduce probe: two real processes on this machine sum 1 + 2 on one backend.

`run_allreduce` hosts a TCPStore on 127.0.0.1 in this process and starts two processes with
this process's environment (``OMP_NUM_THREADS=1`` set); each initialises the backend as a job
would, all-reduces its rank + 1 and prints the sum. The probe passes when both printed 3.0;
processes still running at the timeout are killed with their sessions. Each process runs
``python -m ddprun.launch.doctor _worker BACKEND RANK STORE_PORT TIMEOUT``: the doctor's hidden
entry, which hands over to `worker_main`, so a process left behind reads as the doctor's.
torch is imported only when the probe runs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import NoReturn

__all__ = ["run_allreduce", "worker_main"]

_RESULT_TAG = "ddprun-doctor-allreduce"


def run_allreduce(backend: str, timeout: float) -> tuple[str | None, float]:
    """Sum 1 + 2 over two real processes on `backend`; (None, s) if they got 3, else (why, s)."""
    from datetime import timedelta

    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=timeout),
                          wait_for_workers=False)  # fmt: skip
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ddprun-doctor-") as folder:
        procs, outputs = [], []
        for rank in range(2):
            out = open(os.path.join(folder, f"rank{rank}.txt"), "w+")  # noqa: SIM115
            outputs.append(out)
            argv = [sys.executable, "-m", "ddprun.launch.doctor", "_worker", backend, str(rank),
                    str(store.port), str(timeout)]  # fmt: skip
            procs.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                          env={**os.environ, "OMP_NUM_THREADS": "1"},
                                          start_new_session=True))  # fmt: skip
        timed_out = _wait_all(procs, start + timeout)
        seconds = time.monotonic() - start
        texts = []
        for out in outputs:
            out.seek(0)
            texts.append(out.read())
            out.close()
    if timed_out:
        return f"did not finish within {timeout:g} s", seconds
    for rank, (proc, text) in enumerate(zip(procs, texts)):
        values = [line.split()[1] for line in text.splitlines() if line.startswith(_RESULT_TAG)]
        if proc.returncode != 0 or values != ["3.0"]:
            last = next((line for line in reversed(text.splitlines()) if line.strip()), "")
            return f"rank {rank} exited with {proc.returncode}: {last.strip()[:300]}", seconds
    return None, seconds


def _wait_all(procs: Sequence[subprocess.Popen], deadline: float) -> bool:
    """Wait for every process until `deadline`; kill what is left. True if it had to."""
    while any(proc.poll() is None for proc in procs):
        if time.monotonic() > deadline:
            for proc in procs:
                if proc.poll() is None:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                proc.wait()
            return True
        time.sleep(0.05)
    return False


def worker_main(argv: Sequence[str]) -> NoReturn:
    """One all-reduce process: ``_worker BACKEND RANK STORE_PORT TIMEOUT``."""
    backend, rank, port, timeout = argv[0], int(argv[1]), int(argv[2]), float(argv[3])
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    wait = timedelta(seconds=timeout)
    store = dist.TCPStore("127.0.0.1", port, None, False, wait)
    dist.init_process_group(backend, store=store, rank=rank, world_size=2, timeout=wait)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    value = torch.tensor([rank + 1.0], device=device)
    dist.all_reduce(value)
    print(_RESULT_TAG, float(value.item()), flush=True)
    dist.destroy_process_group()
    os._exit(0)  # skip finalization: the result is out, nothing else to save
