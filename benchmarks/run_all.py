"""Run every benchmark and print one markdown table: ddprun next to plain PyTorch / torchrun,
with the ratios and the targets.

    python benchmarks/run_all.py [--quick] [--only single,ddp,import,sync,gpu,frameworks]
                                 [--json out.json] [--record benchmarks/RESULTS.md]

Sections (each runs as its own subprocess, so one crashing does not hide the others):

- ``single``: per-step overhead in one process, tiny linear and MLP (bench_single.py);
- ``ddp``: ``ddprun --nproc 2`` vs ``torchrun --nproc-per-node 2`` per step, whole-process wall
  time, and launcher start-up to the first training step (bench_ddp.py; ``startup`` is an alias);
- ``import``: ``import ddprun`` / ``from ddprun import dl`` over ``import torch`` (bench_import.py);
- ``sync``: collectives and bytes per loader end for 1, 5, 20 metrics on 2 gloo ranks
  (bench_sync.py);
- ``gpu``: plain vs ddprun throughput and host syncs per step, fp32/bf16/fp16 (bench_gpu.py;
  "skipped: no GPU" without CUDA);
- ``frameworks``: rows for PyTorch Lightning / Accelerate / Ignite only when importable
  (bench_frameworks.py).

``--record FILE`` replaces the block between ``<!-- results:start -->`` and
``<!-- results:end -->`` in FILE (creating it if needed) with the machine, date, torch version,
command and table, and leaves the rest of the file (notes, analysis) alone.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_common as bc  # noqa: E402

SECTIONS = {
    "single": "bench_single.py",
    "ddp": "bench_ddp.py",
    "import": "bench_import.py",
    "sync": "bench_sync.py",
    "gpu": "bench_gpu.py",
    "frameworks": "bench_frameworks.py",
}
ALIASES = {"startup": "ddp", "distributed": "ddp", "metrics": "sync"}
START, END = "<!-- results:start -->", "<!-- results:end -->"


def run_section(name: str, quick: bool, timeout: float) -> tuple[list[dict[str, Any]], str]:
    """Run one benchmark script; return its result records and an error line ('' if fine)."""
    cmd = [sys.executable, str(HERE / SECTIONS[name]), *(["--quick"] if quick else [])]
    bc.log(f"== {name}: {' '.join(Path(c).name if i < 2 else c for i, c in enumerate(cmd))}")
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, stdout=subprocess.PIPE, stderr=None, text=True, timeout=timeout, cwd=HERE.parent
        )
    except subprocess.TimeoutExpired:
        return [], f"{name}: timed out after {timeout:.0f} s"
    results = bc.parse_results(proc.stdout)
    bc.log(f"== {name}: {time.perf_counter() - start:.1f} s, exit {proc.returncode}")
    if proc.returncode != 0:
        tail = " | ".join(proc.stdout.strip().splitlines()[-3:])
        return results, f"{name}: exit {proc.returncode} {tail}"
    return results, ""


# ------------------------------------------------------------------------- table
def _ms(seconds: float) -> str:
    return bc.fmt_time(seconds)


def _met(ok: bool | None) -> str:
    return "n/a" if ok is None else ("yes" if ok else "**no**")


def _met_spread(r: dict[str, Any]) -> str:
    """Met, for a ratio whose runs spread across the target: say so rather than yes or no."""
    if r["ratio"] <= r["target"]:
        return "yes"
    if r["ratio_min"] <= r["target"]:
        return "**no** (runs spread across the target)"
    return "**no**"


def _ratio_cell(r: dict[str, Any]) -> str:
    return f"x{r['ratio']:.3f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})"


def table(results: Sequence[dict[str, Any]], errors: Sequence[str]) -> str:
    rows: list[tuple[str, ...]] = []

    def add(row: tuple[str, ...]) -> None:
        # informational rows leave the target and met cells empty
        rows.append(tuple(row) + ("",) * (6 - len(row)))

    for r in results:
        section = r.get("section")
        if "skipped" in r:
            add((f"{section}", "", "", f"skipped: {r['skipped']}", "", ""))
            continue
        if section == "single":
            add(
                (
                    f"1 process, {r['model']}: train time per step (median, {r['reps']} pairs)",
                    _ms(r["plain_step_s"]),
                    _ms(r["ddprun_step_s"]),
                    _ratio_cell(r),
                    f"<= {r['target']:.2f}",
                    _met(r["ratio"] <= r["target"]),
                )
            )
            add(
                (
                    f"1 process, {r['model']}: process CPU time per train step",
                    _ms(r["plain_cpu_step_s"]),
                    _ms(r["ddprun_cpu_step_s"]),
                    f"x{r['cpu_ratio']:.3f}",
                )
            )
            add(
                (
                    f"1 process, {r['model']}: train-loader time / steps",
                    _ms(r["plain_mean_step_s"]),
                    _ms(r["ddprun_mean_step_s"]),
                    f"x{r['mean_ratio']:.3f}",
                )
            )
            add(
                (
                    f"1 process, {r['model']}: whole run ({r['workload']['epochs']} epochs)",
                    f"{r['plain_wall_s']:.2f} s",
                    f"{r['ddprun_wall_s']:.2f} s",
                    f"x{r['wall_ratio']:.3f}",
                )
            )
        elif section == "ddp":
            add(
                (
                    f"2 procs gloo, {r['model']}: train time per step, separate launches "
                    f"(torchrun+plain vs ddprun+ddprun; {r['reps']} rounds)",
                    _ms(r["torchrun_step_s"]),
                    _ms(r["ddprun_step_s"]),
                    _ratio_cell(r),
                    f"<= {r['target']:.2f}",
                    _met_spread(r),
                )
            )
            add(
                (
                    f"2 procs gloo, {r['model']}: process CPU time per train step, rank 0 "
                    f"(ddprun+plain script: {_ms(r['ddprun_plain_cpu_step_s'])})",
                    _ms(r["torchrun_cpu_step_s"]),
                    _ms(r["ddprun_cpu_step_s"]),
                    f"x{r['cpu_ratio']:.3f}",
                )
            )
            if "ddprun_nostop_step_s" in r:
                add(
                    (
                        f"2 procs gloo, {r['model']}: ddprun without its in-loop stop agreement"
                        " (median step; CPU per step)",
                        f"{_ms(r['torchrun_step_s'])}; {_ms(r['torchrun_cpu_step_s'])}",
                        f"{_ms(r['ddprun_nostop_step_s'])}; {_ms(r['ddprun_nostop_cpu_step_s'])}",
                        f"x{r['ddprun_nostop_step_s'] / r['torchrun_step_s']:.3f}; "
                        f"x{r['ddprun_nostop_cpu_step_s'] / r['torchrun_cpu_step_s']:.3f}",
                    )
                )
            add(
                (
                    f"2 procs gloo, {r['model']}: CPU time of the launcher process itself "
                    "(agent, not its workers)",
                    f"{r['torchrun_launcher_cpu_s']:.2f} s",
                    f"{r['ddprun_launcher_cpu_s']:.2f} s",
                    f"x{r['ddprun_launcher_cpu_s'] / r['torchrun_launcher_cpu_s']:.3f}",
                )
            )
            add(
                (
                    f"2 procs gloo, {r['model']}: whole process, launcher start to exit",
                    f"{r['torchrun_wall_s']:.2f} s",
                    f"{r['ddprun_wall_s']:.2f} s",
                    f"x{r['wall_ratio']:.3f} (ddprun+plain script: "
                    f"{r['ddprun_plain_wall_s']:.2f} s)",
                )
            )
        elif section == "ddp_lockstep":
            add(
                (
                    f"2 procs gloo, {r['model']}: train time per step, lockstep (hand-written "
                    f"DDP loop and Runner in one `ddprun --nproc 2` job, turns every "
                    f"{r['every']} steps; {r['runs'] // 2} pairs of launches)",
                    _ms(r["plain_step_s"]),
                    _ms(r["ddprun_step_s"]),
                    _ratio_cell(r) + ("" if r["same_valid_loss"] else "; **valid loss differs**"),
                    f"<= {r['target']:.2f}",
                    _met_spread(r),
                )
            )
        elif section == "startup":
            add(
                (
                    "start-up: launcher start to first train step (torchrun+plain vs "
                    f"ddprun+ddprun; {r['runs_per_combo']} runs)",
                    f"{r['torchrun_plain_s']:.2f} s",
                    f"{r['ddprun_ddprun_s']:.2f} s",
                    f"{r['delta_s']:+.2f} s",
                    f"<= +{r['target_delta_s']:.1f} s",
                    _met(r["delta_s"] <= r["target_delta_s"]),
                )
            )
            add(
                (
                    "start-up, launcher alone (ddprun + the plain script)",
                    f"{r['torchrun_plain_s']:.2f} s",
                    f"{r['ddprun_plain_s']:.2f} s",
                    f"{r['launcher_delta_s']:+.2f} s",
                )
            )
        elif section == "import":
            dl = r["statement"] != "import ddprun"
            if not dl:
                add(
                    (
                        f"import: `{r['statement']}` (fresh interpreters, median of {r['reps']})",
                        f"{r['torch_s']:.3f} s (`import torch`)",
                        f"{r['fresh_s']:.3f} s",
                        "does not import torch",
                        f"<= +{r['target_delta_s']:.1f} s",
                        _met(r["fresh_s"] <= r["target_delta_s"]),
                    )
                )
                continue
            add(
                (
                    f"import: `{r['statement']}` beyond torch's own import (fresh interpreter "
                    f"imports torch, then ddprun; median of {r['reps']})",
                    "",
                    f"+{r['increment_s']:.3f} s",
                    f"slowest: {', '.join(name for name, _ in r['slowest_extra_modules'][:3])}",
                    f"<= +{r['target_delta_s']:.1f} s",
                    _met(r["increment_s"] <= r["target_delta_s"]),
                )
            )
            add(
                (
                    f"import: `{r['statement']}` vs `import torch`, whole fresh interpreters "
                    "(torch's own import time swings by +-0.1 s between runs)",
                    f"{r['torch_s']:.3f} s",
                    f"{r['fresh_s']:.3f} s",
                    f"{r['delta_s']:+.3f} s (median of paired differences)",
                    f"<= +{r['target_delta_s']:.1f} s",
                    _met(r["delta_s"] <= r["target_delta_s"]),
                )
            )
        elif section == "sync" and r["kind"] == "direct":
            add(
                (
                    f"metric sync, {r['metrics']} metrics ({r['states']} states), 2 gloo ranks: "
                    "collectives / bytes / time",
                    f"{r['states']} / - / {_ms(r['naive_sync_s'])} (one per state)",
                    f"{r['collectives']} / {r['bytes']} B / {_ms(r['sync_s'])}",
                    " + ".join(r["ops"]),
                    "1 collective",
                    _met(r["collectives"] <= r["target_collectives"]),
                )
            )
        elif section == "sync" and r["kind"] == "runner":
            per = r["per_loader"]
            worst = max(p["dist_at_end"] for p in per)
            cells = "; ".join(
                f"{p['loader']}: {p['dist_at_end']} ({' + '.join(p['dist_ops_at_end'])}), "
                f"of which metric sync {p['collectives']} ({p['bytes']} B); "
                f"{p['dist_per_batch']:.3g} per batch over {p['batches']} batches"
                for p in per
            )
            first = r.get("first_epoch") or []
            if first:
                cells += (
                    " (first epoch of a run: "
                    + ", ".join(f"{p['loader']} {p['dist_at_end']}" for p in first)
                    + ", the key agreement)"
                )
            add(
                (
                    f"loader end through Runner, {r['metric_callbacks']} metric callbacks + loss:"
                    " torch.distributed collectives per loader end",
                    "",
                    cells,
                    "",
                    "1 per loader end",
                    _met(worst <= r["target_collectives"]),
                )
            )
        elif section == "gpu":
            syncs = (
                f"{r['plain_syncs_per_step']:.2f} vs {r['ddprun_syncs_per_step']:.2f} syncs/step"
                if r["plain_syncs_per_step"] is not None
                else "syncs not counted"
            )
            add(
                (
                    f"{r['device']}, {r['model']} {r['precision']}, batch {r['batch_size']}: "
                    "samples/s",
                    f"{r['plain_samples_per_s']:.0f}",
                    f"{r['ddprun_samples_per_s']:.0f}",
                    f"x{r['ratio']:.3f} time; {syncs}",
                )
            )
        elif section == "frameworks":
            add(
                (
                    f"{r['framework']}, {r['model']}: train time per step",
                    _ms(r["plain_step_s"]),
                    _ms(r["framework_step_s"]),
                    f"x{r['ratio']:.3f} (vs plain; ddprun x{r['ddprun_ratio']:.3f})",
                )
            )
    for error in errors:
        add(("error", "", "", error.replace("|", "/"), "", ""))
    header = ("Benchmark", "Reference", "ddprun", "ddprun vs reference", "Target", "Met")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> dict[str, str]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=HERE.parent,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    return {
        "commit": commit or "unknown",
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "machine": f"{cpu}, {cores} cores, {platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "load": ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "",
    }


def record(path: Path, block: str) -> None:
    text = path.read_text() if path.exists() else "# ddprun benchmarks\n\n"
    new = f"{START}\n{block}\n{END}"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + new + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + new + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small workloads, few repetitions")
    parser.add_argument("--only", default="", help=f"comma list of {', '.join(SECTIONS)}")
    parser.add_argument("--json", default=None, help="also write all result records here")
    parser.add_argument("--record", default=None, help="update this RESULTS.md block")
    parser.add_argument("--timeout", type=float, default=1800.0, help="per section, seconds")
    args = parser.parse_args(argv)
    wanted = [ALIASES.get(s, s) for s in args.only.split(",") if s] or list(SECTIONS)
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; expected {list(SECTIONS)}")
    info = machine()
    load_before = info["load"]
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    errors: list[str] = []
    for name in dict.fromkeys(wanted):
        found, error = run_section(name, args.quick, args.timeout)
        results += found
        if error:
            errors.append(error)
    elapsed = time.perf_counter() - started
    info["load"] = f"{load_before} before, {machine()['load']} after"
    command = "python benchmarks/run_all.py" + (" --quick" if args.quick else "")
    command += f" --only {args.only}" if args.only else ""
    summary = (
        f"- date: {info['date']}\n- machine: {info['machine']}\n"
        f"- python {info['python']}, torch {info['torch']}, CUDA device: {info['cuda']}\n"
        f"- ddprun commit: {info['commit']}\n"
        f"- load average (1/5/15 min): {info['load']}\n"
        f"- command: `{command}` ({elapsed:.0f} s)\n\n{table(results, errors)}"
    )
    print(summary, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "results": results}, indent=1))
    if args.record:
        record(Path(args.record), summary)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
