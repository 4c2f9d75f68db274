"""Run every benchmark and print one markdown table: ddprun next to plain PyTorch / torchrun,
with the ratios and the targets.

    python benchmarks/run_all.py [--quick] [--only single,fresh,ddp,import,sync,fsdp,gpu]
                                 [--record benchmarks/RESULTS.md]

Each section runs as its own subprocess (one crashing does not hide the others): ``single`` and
``fresh`` (bench_single.py: runs alternating in one process / in fresh processes), ``ddp``
(bench_ddp.py: two gloo processes, launcher start-up; alias ``startup``), ``import``,
``sync`` (bench_ddp.py: collectives per loader end) and ``gpu`` ("skipped: no GPU" without CUDA).

The table is data: `ROWS`, rows of format strings over each result record. ``--record FILE``
replaces the block between the ``results`` markers in FILE and leaves the rest alone.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_common as bc  # noqa: E402

SECTIONS = {
    "single": ["bench_single.py", "--methods", "alternate"],
    "fresh": ["bench_single.py", "--methods", "fresh"],
    "ddp": ["bench_ddp.py", "--parts", "separate,lockstep"],
    "import": ["bench_import.py"],
    "sync": ["bench_ddp.py", "--parts", "sync"],
    "fsdp": ["bench_ddp.py", "--parts", "fsdp"],
    "gpu": ["bench_gpu.py"],
}
ALIASES = {"startup": "ddp", "distributed": "ddp", "metrics": "sync"}
START, END = "<!-- results:start -->", "<!-- results:end -->"


class Row(NamedTuple):
    """A row per record of `section` (and only if its `when` key is set): label and cells are
    format strings over the record; `met` = (value, limit), each a key or a number."""

    section: str
    label: str
    ref: str = ""
    ours: str = ""
    vs: str = ""
    target: str = ""
    met: tuple[str, str | float] | None = None
    when: str | None = None


P1, P2 = "1 process, {model}", "2 procs gloo, {model}"
FRESH = P1 + ", fresh processes ({reps} pairs, {workload} workload)"
ROWS = [
    Row("single", P1 + ": train time per step, runs alternating in one process ({reps} pairs, "
        "{workload} workload)", "{step[ref]:t}", "{step[ours]:t}", "{step:r}",
        "<= {target:.2f}", ("step", "target"), when="wall"),
    Row("single", P1 + ": process CPU time per train step, alternating", "{cpu[ref]:t}",
        "{cpu[ours]:t}", "{cpu[ratio]:x}", when="wall"),
    Row("single", FRESH + ": time per batch (training call / batches)", "{step[ref]:t}",
        "{step[ours]:t}", "{step:r}", "<= {target:.2f}", ("step", "target"), when="process"),
    Row("single", FRESH + ": time per batch, epochs after the first", "{later[ref]:t}",
        "{later[ours]:t}", "{later:r}", when="later"),
    Row("single", FRESH + ": process CPU time per batch", "{cpu[ref]:t}", "{cpu[ours]:t}",
        "{cpu[ratio]:x}", when="process"),
    Row("single", FRESH + ": whole process, start to exit (imports included)",
        "{process[ref]:.2f} s", "{process[ours]:.2f} s", "{process:r}", when="process"),
    Row("ddp", P2 + ": train time per step, separate launches (torchrun+plain vs ddprun+ddprun; "
        "{reps} rounds)", "{step[ref]:t}", "{step[ours]:t}", "{step:r}", "<= {target:.2f}",
        ("step", "target")),
    Row("ddp", P2 + ": process CPU time per train step, rank 0 (ddprun+plain script: "
        "{control_cpu_s:t})", "{cpu[ref]:t}", "{cpu[ours]:t}", "{cpu[ratio]:x}"),
    Row("ddp", P2 + ": CPU time of the launcher process itself (not its workers)",
        "{launcher_cpu[ref]:.2f} s", "{launcher_cpu[ours]:.2f} s", "{launcher_cpu[ratio]:x}"),
    Row("ddp", P2 + ": whole process, launcher start to exit", "{wall[ref]:.2f} s",
        "{wall[ours]:.2f} s", "{wall[ratio]:x} (ddprun+plain script: {control_wall_s:.2f} s)"),
    Row("ddp_lockstep", P2 + ": train time per step, lockstep (hand-written DDP loop and Runner "
        "in one `ddprun --nproc 2` job, turns every {every} steps; {pairs} pairs of launches)",
        "{step[ref]:t}", "{step[ours]:t}", "{step:r}{same_note}", "<= {target:.2f}",
        ("step", "target")),
    Row("startup", "start-up: launcher start to first train step (torchrun+plain vs "
        "ddprun+ddprun; {runs} runs)", "{torchrun_s:.2f} s", "{ddprun_s:.2f} s",
        "{delta_s:+.2f} s", "<= +{target_delta_s:.1f} s", ("delta_s", "target_delta_s")),
    Row("startup", "start-up, launcher alone (ddprun + the plain script)", "{torchrun_s:.2f} s",
        "{control_s:.2f} s", "{launcher_delta_s:+.2f} s"),
    Row("import", "import: `from ddprun import dl` beyond torch's own import (a fresh "
        "interpreter imports torch, then ddprun; median of {reps})", "", "+{increment_s:.3f} s",
        "slowest: {slowest:list}", "<= +{target_delta_s:.1f} s",
        ("increment_s", "target_delta_s")),
    Row("import", "import: `from ddprun import dl` vs `import torch`, whole fresh interpreters",
        "{torch_s:.3f} s", "{dl_s:.3f} s", "{delta_s:+.3f} s (median of paired differences)",
        "<= +{target_delta_s:.1f} s", ("delta_s", "target_delta_s")),
    Row("sync", "loader end through Runner, {metric_callbacks} metric callbacks + loss: "
        "torch.distributed collectives (2 gloo ranks)", "", "train: {train[at_end]} at the end "
        "({train[ops]:list}, {train[bytes]} B), {train[per_batch]:.3g} per batch; valid: "
        "{valid[at_end]} ({valid[bytes]} B)", "", "1 per loader end", ("at_end", 1)),
    Row("fsdp", P2 + ": train time per step, the same Runner on FSDPEngine vs the DDP engine "
        "(CPU, for the record; {reps} rounds)", "{step[ref]:t}", "{step[ours]:t}", "{step:r}"),
    Row("gpu", "{device}, {model} {precision}, batch {batch_size}: samples/s; host syncs per "
        "step", "{plain_samples_per_s:.0f}; {plain_syncs:.2f}",
        "{ddprun_samples_per_s:.0f}; {ddprun_syncs:.2f}", "{ratio:x} time"),
]  # fmt: skip


class _Value:
    """A record value in a format string: ``:t`` a time, ``:x`` a ratio, ``:r`` a paired
    ratio with its range, ``:list`` a list; None shows as n/a."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __getitem__(self, key: str) -> _Value:
        return _Value(self.value[key])

    def __format__(self, spec: str) -> str:
        value = self.value
        if value is None:
            return "n/a"
        if spec == "r":
            return f"x{value['ratio']:.3f} ({value['ratio_min']:.2f}-{value['ratio_max']:.2f})"
        if spec == "list":
            return ", ".join(map(str, value))
        if spec == "t":
            return bc.fmt_time(value)
        return f"x{value:.3f}" if spec == "x" else format(value, spec)


def _met(row: Row, record: dict[str, Any]) -> str:
    if row.met is None:
        return ""
    value, limit = (record[k] if isinstance(k, str) else k for k in row.met)
    if isinstance(value, dict):  # a paired ratio: say so when only some pairs meet the target
        if value["ratio"] <= limit:
            return "yes"
        return "**no** (runs spread across the target)" if value["ratio_min"] <= limit else "**no**"
    return "yes" if value <= limit else "**no**"


def table(results: Sequence[dict[str, Any]], errors: Sequence[str]) -> str:
    """The markdown table of `results` (in their order, each by its `ROWS`) and `errors`."""
    lines = [
        "| Benchmark | Reference | ddprun | ddprun vs reference | Target | Met |",
        "|---" * 6 + "|",
    ]
    for record in results:
        if "skipped" in record:
            lines.append(f"| {record['section']} |  |  | skipped: {record['skipped']} |  |  |")
            continue
        view = {key: _Value(value) for key, value in record.items()}
        for row in ROWS:
            if row.section == record["section"] and (not row.when or record.get(row.when)):
                cells = [c.format_map(view) for c in row[1:6]]
                lines.append("| " + " | ".join([*cells, _met(row, record)]) + " |")
    lines += [f"| error |  |  | {error.replace('|', '/')} |  |  |" for error in errors]
    return "\n".join(lines)


def run_section(name: str, quick: bool, timeout: float) -> tuple[list[dict[str, Any]], str]:
    """Run one benchmark script; return its result records and an error line ('' if fine)."""
    script, *args = SECTIONS[name]
    cmd = [sys.executable, str(HERE / script), *args, *(["--quick"] if quick else [])]
    bc.log(f"== {name}: {script} {' '.join(cmd[2:])}")
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, stdout=subprocess.PIPE, text=True, timeout=timeout, cwd=HERE.parent
        )
    except subprocess.TimeoutExpired:
        return [], f"{name}: timed out after {timeout:.0f} s"
    bc.log(f"== {name}: {time.perf_counter() - start:.1f} s, exit {proc.returncode}")
    results = bc.parse_results(proc.stdout)
    if proc.returncode != 0:
        tail = " | ".join(proc.stdout.strip().splitlines()[-3:])
        return results, f"{name}: exit {proc.returncode} {tail}"
    return results, ""


def machine() -> dict[str, str]:
    """Where and what ran: CPU, cores, python, torch, CUDA device, commit, load average."""
    import torch

    info = Path("/proc/cpuinfo").read_text().splitlines() if os.path.exists("/proc/cpuinfo") else []
    names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
    cpu = names[0] if names else platform.processor() or platform.machine()
    git = ["git", "describe", "--always", "--dirty"]
    commit = subprocess.run(git, cwd=HERE.parent, capture_output=True, text=True).stdout.strip()
    return {
        "commit": commit or "unknown",
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "machine": f"{cpu}, {len(os.sched_getaffinity(0))} cores, {platform.system()} "
        f"{platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "load": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def record(path: Path, block: str) -> None:
    """Replace the block between the markers in `path` (append one if there is none)."""
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
    parser.add_argument("--record", default=None, help="update this RESULTS.md block")
    parser.add_argument("--timeout", type=float, default=1800.0, help="per section, seconds")
    args = parser.parse_args(argv)
    wanted = [ALIASES.get(s, s) for s in args.only.split(",") if s] or list(SECTIONS)
    if unknown := [s for s in wanted if s not in SECTIONS]:
        parser.error(f"unknown section(s) {unknown}; expected {list(SECTIONS)}")
    info = machine()
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    errors: list[str] = []
    for name in dict.fromkeys(wanted):
        found, error = run_section(name, args.quick, args.timeout)
        results += found
        errors += [error] if error else []
    info["load"] += f" before, {machine()['load']} after"
    command = "python benchmarks/run_all.py" + (" --quick" if args.quick else "")
    command += f" --only {args.only}" if args.only else ""
    summary = (
        f"- date: {info['date']}\n- machine: {info['machine']}\n"
        f"- python {info['python']}, torch {info['torch']}, CUDA device: {info['cuda']}\n"
        f"- ddprun commit: {info['commit']}\n- load average (1/5/15 min): {info['load']}\n"
        f"- command: `{command}` ({time.perf_counter() - started:.0f} s)\n\n"
        + table(results, errors)
    )
    print(summary, flush=True)
    if args.record:
        record(Path(args.record), summary)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
