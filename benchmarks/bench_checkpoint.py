"""Checkpoint benchmark (issue 14): training time blocked per save, synchronous vs asynchronous,
and the memory two ranks use to resume from a large checkpoint.

    python benchmarks/bench_checkpoint.py            # 117 MB model (235 MB state), 537 MB load
    python benchmarks/bench_checkpoint.py --quick    # small sizes, a smoke run

Blocked time: a CPU model of 2048x2048 layers with SGD momentum trains with one thread; every
save packs model + optimizer (`IEngine.pack_checkpoint`) and writes ``last.pth``. Synchronous:
the training side waits for the whole write (serialise, checksum, fsync, rename). Asynchronous:
it waits for the CPU snapshot only, then trains while the writer thread works; the next save
starts once the write is over. Step times idle and during background writes show what the
writer costs the training thread (CPU and GIL).

Resume memory: two processes (RANK 0 and 1 set, as two ranks) each build the model, then load
the checkpoint and copy it into the model. Peak RSS and private memory are reported above the
model's own memory: one full copy per process is the model itself, anything above it is what
the load costs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ddprun.checkpoint import unpack_checkpoint  # noqa: E402
from ddprun.checkpoint_manifest import verify  # noqa: E402
from ddprun.engines.engine import IEngine  # noqa: E402


def make_model(width: int, layers: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])


def state_mb(model: nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


# ------------------------------------------------------------------ blocked time
def bench_blocked(folder: Path, layers: int, saves: int) -> list[tuple[str, str]]:
    torch.set_num_threads(1)
    model = make_model(2048, layers)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    batch = torch.randn(8, 2048)

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad()
        model(batch).square().mean().backward()
        optimizer.step()
        return time.perf_counter() - start

    engine = IEngine("cpu")
    for _ in range(3):
        step()
    idle, during, sync, blocked, writes = [], [], [], [], []
    for _ in range(saves):
        idle += [step() for _ in range(3)]
        start = time.perf_counter()
        engine.save_checkpoint(engine.pack_checkpoint(model, None, optimizer), folder / "s.pth")
        sync.append(time.perf_counter() - start)
    for _ in range(saves):
        idle += [step() for _ in range(3)]
        start = time.perf_counter()
        state = engine.pack_checkpoint(model, None, optimizer)
        future = engine.save_checkpoint(state, folder / "a.pth", async_=True)
        blocked.append(time.perf_counter() - start)
        while not future.done():
            during.append(step())
        writes.append(time.perf_counter() - start)
        engine.wait_for_checkpoint()
    size = (folder / "a.pth").stat().st_size / 2**20
    steady = statistics.median(blocked[1:]) if len(blocked) > 1 else blocked[0]
    med = statistics.median
    ratio = med(sync) / steady
    ratio_first = med(sync) / blocked[0]
    return [
        ("checkpoint (model + momentum)", f"{size:.0f} MiB ({state_mb(model):.0f} MiB of weights)"),
        ("sync save: training blocked per save (median)", f"{med(sync) * 1e3:.0f} ms"),
        ("async save: blocked, first save (fresh buffers)", f"{blocked[0] * 1e3:.0f} ms"),
        ("async save: blocked, later saves (median)", f"{steady * 1e3:.0f} ms"),
        ("sync / async blocked (target >= 5)", f"x{ratio:.1f} (first save x{ratio_first:.1f})"),
        ("async: background write, snapshot to renamed file", f"{med(writes) * 1e3:.0f} ms"),
        ("train step idle / during a background write", f"{med(idle) * 1e3:.0f} / "
         f"{(med(during) if during else float('nan')) * 1e3:.0f} ms ({len(during)} steps)"),
    ]  # fmt: skip


# ------------------------------------------------------------------ resume memory
def _memory() -> dict[str, float]:
    """VmRSS, VmHWM (peak), RssAnon (private) and RssFile of this process, in MiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def _load_file_mmap(path: Path, model: nn.Module) -> dict:
    state = IEngine("cpu").load_checkpoint(path)  # ddprun's DDP path: every rank maps the file
    unpack_checkpoint(state, model=model)
    return state


def _load_file_whole(path: Path, model: nn.Module) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=False)  # the baseline: no mmap
    unpack_checkpoint(state, model=model)
    return state


def _fsdp_engine_and_model(model: nn.Module) -> tuple[Any, nn.Module]:
    from ddprun.engines.fsdp import FSDPEngine

    engine = FSDPEngine(backend="gloo")
    engine.setup()  # joins the group the parent described (RANK, WORLD_SIZE, MASTER_*)
    return engine, engine.prepare_model(model)


def _write_fsdp_folder(path: Path, prepared: Any) -> dict:
    engine, sharded = prepared
    engine.save_checkpoint(engine.pack_checkpoint(sharded), path)
    raise NotImplementedError("written")  # nothing to measure: the folder for the next pair


def _load_fsdp_folder(path: Path, prepared: Any) -> dict:
    engine, sharded = prepared
    state = engine.load_checkpoint(path)  # every rank reads its own shards
    engine.unpack_checkpoint(state, model=sharded)
    return state


LOADERS = {
    "DDP file, memory-mapped (ddprun)": _load_file_mmap,
    "file read whole (torch.load, no mmap)": _load_file_whole,
    "write the FSDP folder": _write_fsdp_folder,
    "FSDP sharded folder (ddprun)": _load_fsdp_folder,
}


def child(path: str, variant: str, width: int, layers: int) -> None:
    torch.set_num_threads(1)
    model = make_model(width, layers)
    if "FSDP" in variant:  # the group and the sharded model exist before the measured load
        model = _fsdp_engine_and_model(model)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak from here on
    before = _memory()
    start = time.perf_counter()
    try:
        state = LOADERS[variant](Path(path), model)
    except NotImplementedError as error:
        print(json.dumps({"skipped": str(error)}))
        return
    seconds = time.perf_counter() - start
    after = _memory()  # the loaded state is still alive: the private-memory peak
    del state
    peak = after["VmHWM"] - before["VmRSS"]
    private = after["RssAnon"] - before["RssAnon"]
    print(json.dumps({"peak": peak, "private": private, "seconds": seconds}))


def bench_memory(folder: Path, width: int, layers: int) -> list[tuple[str, str]]:
    model = make_model(width, layers)
    path = folder / "big.pth"
    IEngine("cpu").save_checkpoint(IEngine("cpu").pack_checkpoint(model), path)
    size = path.stat().st_size / 2**20
    del model
    start = time.perf_counter()
    assert verify(path) == []
    checked = time.perf_counter() - start
    rows = [("resume checkpoint (model weights)", f"{size:.0f} MiB file, 2 ranks")]
    rows.append(("verify it (size + checksum, what a resume adds)", f"{checked:.2f} s"))
    for index, variant in enumerate(LOADERS):
        target = path.with_suffix("") if "FSDP" in variant else path
        procs = [_start_child(target, variant, width, layers, rank, index) for rank in (0, 1)]
        results = [
            json.loads(p.communicate(timeout=600)[0].strip().splitlines()[-1]) for p in procs
        ]
        if any("skipped" in r for r in results):
            continue  # the FSDP folder written for the next pair
        peak = max(r["peak"] for r in results)
        private = max(r["private"] for r in results)
        seconds = max(r["seconds"] for r in results)
        value = f"{peak:.0f} MiB peak RSS ({private:.0f} MiB private), {seconds:.1f} s"
        rows.append((f"{variant}: above the model, worst rank", value))
    return rows


def _start_child(
    path: Path, variant: str, width: int, layers: int, rank: int, index: int
) -> subprocess.Popen:
    env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29561 + index), OMP_NUM_THREADS="1")
    argv = [sys.executable, __file__, "--child", str(path), variant, str(width), str(layers)]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--saves", type=int, default=4, help="saves per mode")
    parser.add_argument("--folder", help="where checkpoints go (default: a temporary folder)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        path, variant, width, layers = args.child
        child(path, variant, int(width), int(layers))
        return
    blocked_layers, load_shape = (2, (1024, 2)) if args.quick else (7, (4096, 8))
    with tempfile.TemporaryDirectory(prefix="ddprun-bench-ckpt-", dir=args.folder) as tmp:
        rows = bench_blocked(Path(tmp), blocked_layers, args.saves)
        rows += bench_memory(Path(tmp), *load_shape)
    load = os.getloadavg()
    print(f"\ntorch {torch.__version__}, {os.cpu_count()} CPUs, load average {load[0]:.2f}\n")
    print("| Checkpoint benchmark | Value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
