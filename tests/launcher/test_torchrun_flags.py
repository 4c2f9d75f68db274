"""torchrun's flags under ddprun, in both spellings: each one starts a real 2-rank job over
127.0.0.1 and its meaning is checked; invalid values exit 2 with one line naming the flag."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ddprun.distributed import find_free_port
from ddprun.launch import flags
from ddprun.launch.cli import UsageError, build_settings, split_argv
from ddprun.launch.settings import LaunchSettings

from .helpers import (
    Result,
    clean_env,
    ddprun_argv,
    kill_everything,
    run_ddprun,
    worker_processes,
    write_script,
)

# Each rank: one all-reduce, a marker with what it saw, one line on stdout and one on stderr.
JOB = """\
import json, socket
wrapped = b"ddprun.launch.worker" in open("/proc/self/cmdline", "rb").read()
restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
if os.environ.get("FAIL_FIRST") and RANK == 1 and restart == 0:
    sys.exit(3)
dist.init_process_group(backend="gloo")
t = torch.tensor([RANK + 1.0])
dist.all_reduce(t)
port = os.environ.get("CHECK_PORT")  # the rendezvous store must listen there
if port:
    with socket.create_connection(("127.0.0.1", int(port)), timeout=5):
        pass
names = ("WORLD_SIZE", "LOCAL_RANK", "GROUP_RANK", "ROLE_NAME", "MASTER_ADDR",
         "TORCHELASTIC_RUN_ID", "NODE_TAG")
marker = {name: os.environ.get(name) for name in names}
marker.update(rank=RANK, sum=t.item(), wrapped=wrapped, restart=restart)
with open(os.path.join(os.environ["MARKERS"], f"rank{RANK}.json"), "w") as fp:
    json.dump(marker, fp)
print(f"out rank{RANK}", flush=True)
print(f"err rank{RANK}", file=sys.stderr, flush=True)
dist.destroy_process_group()
"""
JOB_TIMEOUT = 240  # seconds; the machine is shared and every worker imports torch


@dataclass
class Job:
    """What one launch left behind."""

    result: Result
    markers: dict[int, dict]
    settings: LaunchSettings
    tmp: Path

    @property
    def console(self) -> str:
        return self.result.output


Check = Callable[[Job], None]


@dataclass
class Case:
    """One job: ``args`` is split on spaces after filling {s} (the script), {t} (the test's
    folder) and {p} (a free port); every job must succeed, then ``checks`` run."""

    spelling: str
    args: str
    checks: tuple[Check, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    nproc: bool = True  # add --nproc 2 unless the case sets the count itself

    def argv(self, tmp: Path, script: Path) -> list[str]:
        words = self.args.format(s=script, t=tmp, p=_PORT).split()
        return ["--nproc", "2", *words] if self.nproc else words


def _ok(job: Job) -> None:
    """The job ran 2 ranks, all-reduced 1 + 2 = 3, exited 0."""
    assert job.result.returncode == 0, job.result.output
    assert sorted(job.markers) == [0, 1], job.result.output
    assert all(m["sum"] == 3.0 and m["WORLD_SIZE"] == "2" for m in job.markers.values())


def _console(shown: tuple[str, ...], hidden: tuple[str, ...] = ()) -> Check:
    def check(job: Job) -> None:
        for text in shown:
            assert text in job.console, (text, job.console)
        for text in hidden:
            assert text not in job.console, (text, job.console)

    return check


def _config(**expected: object) -> Check:
    """The LaunchConfig the agent gets carries the value."""

    def check(job: Job) -> None:
        from ddprun.launch.agent import launch_config_values

        values = launch_config_values(job.settings, None)  # type: ignore[arg-type]
        for name, value in expected.items():
            assert values[name] == value, (name, values[name], value)

    return check


def _marker(**expected: object) -> Check:
    def check(job: Job) -> None:
        for marker in job.markers.values():
            for name, value in expected.items():
                assert marker[name] == value, (name, marker)

    return check


def _settings(test: Callable[[LaunchSettings], bool]) -> Check:
    def check(job: Job) -> None:
        assert test(job.settings), job.settings

    return check


def _rank_logs_in(*parts: str) -> Check:
    def check(job: Job) -> None:
        for rank in (0, 1):
            text = job.tmp.joinpath(*parts, "ranks", f"rank{rank}.log").read_text()
            assert f"out rank{rank}" in text and f"err rank{rank}" in text

    return check


_PORT = find_free_port()  # fixed-port cases; each job releases it when done
_BOTH = ("[rank0]: out rank0", "[rank1]: out rank1", "[rank1]: err rank1")
_PY = sys.executable
CASES = [
    Case("--nnodes", "--nnodes 1 {s}"),
    Case("--nproc", "--nproc 2 {s}", nproc=False),
    Case("--nproc-per-node", "--nproc-per-node 2 {s}", nproc=False),
    Case("--nproc_per_node", "--nproc_per_node auto {s}", nproc=False),  # no GPU here: 2
    Case("--master-addr --master_port", "--master-addr localhost --master_port {p} {s}",
         (_settings(lambda s: s.rendezvous().endpoint == f"localhost:{_PORT}"),),
         env={"CHECK_PORT": str(_PORT)}),
    Case("--master_addr --master-port", "--master_addr localhost --master-port {p} {s}",
         (_settings(lambda s: s.rendezvous().endpoint == f"localhost:{_PORT}"),),
         env={"CHECK_PORT": str(_PORT)}),
    Case("--rdzv-backend", "--rdzv-backend c10d {s}",
         (_settings(lambda s: s.rdzv_backend == "c10d"),)),
    Case("--rdzv_backend", "--rdzv_backend static {s}",
         (_settings(lambda s: s.rdzv_backend == "static"),)),
    Case("--rdzv-endpoint", "--rdzv-endpoint localhost:0 {s}",  # port 0: a free one
         (_config(rdzv_endpoint="localhost:0"),)),
    Case("--rdzv_endpoint", "--rdzv_endpoint 127.0.0.1:{p} {s}",  # the store listens there
         (_config(rdzv_endpoint=f"127.0.0.1:{_PORT}"),), env={"CHECK_PORT": str(_PORT)}),
    Case("--rdzv-id", "--rdzv-id job-a {s}",
         (_marker(TORCHELASTIC_RUN_ID="job-a"), _rank_logs_in("ddprun_logs", "job-a"))),
    Case("--rdzv_id", "--rdzv_id job_b {s}", (_marker(TORCHELASTIC_RUN_ID="job_b"),)),
    Case("--rdzv-conf", "--rdzv-conf join_timeout=120,read_timeout=90 {s}",
         (_config(rdzv_configs={"timeout": 120, "join_timeout": 120, "read_timeout": "90",
                                "is_host": True}),)),
    Case("--rdzv_conf", "--rdzv_conf keep_alive_interval=2 {s}",
         (_settings(lambda s: s.rendezvous().configs["keep_alive_interval"] == "2"),)),
    Case("--standalone", "--standalone --rdzv-endpoint h:1 {s}",  # ignored, as in torchrun
         (_config(rdzv_endpoint="127.0.0.1:0"),)),
    Case("--max-restarts", "--max-restarts 1 {s}", (_marker(restart=1),), {"FAIL_FIRST": "1"}),
    Case("--max_restarts", "--max_restarts 1 {s}", (_marker(restart=1),), {"FAIL_FIRST": "1"}),
    Case("--monitor-interval", "--monitor-interval 0.5 {s}", (_config(monitor_interval=0.5),)),
    Case("--monitor_interval", "--monitor_interval 0.2 {s}", (_config(monitor_interval=0.2),)),
    Case("--start-method", "--start-method fork {s}", (_config(start_method="fork"),)),
    Case("--start_method", "--start_method forkserver {s}",
         (_config(start_method="forkserver"),)),
    Case("--role", "--role trainer {s}", (_marker(ROLE_NAME="trainer"),)),
    Case("-m", "-m job", (_marker(wrapped=True),)),
    Case("--module", "--module job", (_marker(wrapped=True),)),
    Case("--no-python", f"--no-python {_PY} {{s}}", (_marker(wrapped=False),)),
    Case("--no_python", f"--no_python {_PY} -u {{s}}", (_marker(wrapped=False),)),
    Case("--run-path", "--run-path {s}", (_marker(wrapped=True),)),
    Case("--run_path", "--run_path --no-python {s}", (_marker(wrapped=True),)),  # run-path wins
    Case("--logdir", "--logdir {t}/mine {s}", (_rank_logs_in("mine"),)),
    Case("--log-dir", "--log-dir {t}/base --rdzv-id r1 {s}", (_rank_logs_in("base", "r1"),)),
    Case("--log_dir", "--log_dir {t}/base --rdzv-id r2 {s}", (_rank_logs_in("base", "r2"),)),
    # The console: rank 0 by default; -r takes streams off it, -t adds ranks (prefixed).
    Case("--redirects", "--redirects 3 --logdir {t}/L {s}",
         (_console((), ("rank0", "rank1")), _rank_logs_in("L"))),
    Case("-r", "-r 0:1 {s}", (_console(("err rank0",), ("out rank0", "rank1")),)),
    Case("--tee", "--tee {s}", (_console(_BOTH),)),
    Case("--tee 3", "--tee 3 {s}", (_console(_BOTH),)),
    Case("-t", "-t 0:3,1:1 {s}", (_console((*_BOTH[:2], "[rank0]: err rank0"), ("err rank1",)),)),
    Case("--tee=2", "--tee=2 {s}",
         (_console(("[rank1]: err rank1", "[rank0]: out rank0"), ("out rank1",)),)),
    Case("--local-ranks-filter", "--tee --local-ranks-filter 1 {s}",
         (_console(("[rank1]: out rank1",), ("rank0",)),)),
    Case("--local_ranks_filter", "--local_ranks_filter 1 {s}",  # rank 1 is not on the console
         (_console((), ("rank0", "rank1")),)),
    Case("--local-addr", "--local-addr localhost {s}", (_marker(MASTER_ADDR="localhost"),)),
    Case("--local_addr", "--local_addr 127.0.0.1 {s}", (_marker(MASTER_ADDR="127.0.0.1"),)),
    Case("--shutdown-timeout", "--shutdown-timeout 7 {s}", (_config(shutdown_timeout=7),)),
    Case("--shutdown_timeout", "--shutdown_timeout 0 {s}", (_config(shutdown_timeout=0),)),
]  # fmt: skip
# The list of torchrun flags; every spelling of each needs a case that starts a job.
TORCHRUN_FLAGS = (
    "--nnodes --nproc-per-node --node-rank --master-addr --master-port --rdzv-backend "
    "--rdzv-endpoint --rdzv-id --rdzv-conf --standalone --max-restarts --monitor-interval "
    "--start-method --role --module --no-python --run-path --log-dir --redirects --tee "
    "--local-ranks-filter --local-addr --shutdown-timeout"
).split()


def _spellings_covered() -> set[str]:
    covered = {word for case in CASES for word in case.spelling.replace("=", " ").split()}
    return covered | {"--node-rank", "--node_rank"}  # the two-node test below


@pytest.mark.timeout(10)
def test_every_torchrun_flag_and_spelling_has_a_job() -> None:
    table = {spelling: flag for flag in flags.FLAGS for spelling in flag.spellings}
    for name in TORCHRUN_FLAGS:
        assert name in table, f"{name} is missing from the flag table"
        for spelling in table[name].spellings:
            assert spelling in _spellings_covered(), f"no job starts with {spelling}"


def _launch(tmp: Path, args: list[str], env: dict[str, str], cwd: Path) -> Job:
    markers_dir = tmp / "markers"
    markers_dir.mkdir()
    full_env = clean_env(MARKERS=str(markers_dir), **env)
    settings = build_settings(args, full_env)
    result = run_ddprun(tmp, *args, timeout=JOB_TIMEOUT, env=full_env, cwd=cwd)
    markers = {}
    for path in markers_dir.glob("rank*.json"):
        marker = json.loads(path.read_text())
        markers[marker["rank"]] = marker
    return Job(result, markers, settings, tmp)


@pytest.mark.slow  # one real 2-rank job per flag spelling: minutes; CI runs it (-m slow)
@pytest.mark.timeout(JOB_TIMEOUT + 60)
@pytest.mark.parametrize("case", CASES, ids=[case.spelling for case in CASES])
def test_torchrun_flag_starts_a_two_rank_job(tmp_path: Path, case: Case, monkeypatch) -> None:
    script = write_script(tmp_path, "job.py", JOB)
    monkeypatch.chdir(tmp_path)  # settings resolve relative paths as the launcher will
    job = _launch(tmp_path, case.argv(tmp_path, script), case.env, cwd=tmp_path)
    _ok(job)
    for check in case.checks:
        check(job)
    assert worker_processes(str(tmp_path)) == []


@pytest.mark.timeout(JOB_TIMEOUT + 60)
@pytest.mark.parametrize("spelling", ["--node-rank", "--node_rank"])
def test_node_rank_is_kept_across_two_launchers(tmp_path: Path, spelling: str) -> None:
    """Two 'nodes' on one machine; the one started first has node rank 1 and must get
    global rank 1 (the rendezvous alone would make it group 0)."""
    script = write_script(tmp_path, "job.py", JOB)
    port = str(find_free_port())
    markers = tmp_path / "markers"
    markers.mkdir()
    procs = []
    for node in (1, 0):
        folder = tmp_path / f"node{node}"
        folder.mkdir()
        argv = ddprun_argv("--nnodes", "2", spelling, str(node), "--master-addr", "127.0.0.1",
                           "--master-port", port, "--nproc", "1", "--rdzv-timeout", "200", script)  # fmt: skip
        env = clean_env(MARKERS=str(markers), NODE_TAG=f"node{node}")
        out = open(folder / "out.txt", "w")  # noqa: SIM115
        procs.append((subprocess.Popen(argv, cwd=folder, env=env, stdout=out, stderr=out,
                                       start_new_session=True), out))  # fmt: skip
    deadline = time.monotonic() + JOB_TIMEOUT  # one deadline for both launchers
    try:
        for proc, _ in procs:
            proc.wait(max(0.0, deadline - time.monotonic()))
    finally:
        for proc, out in procs:
            kill_everything(proc, str(tmp_path))  # the launcher's group and its workers
            out.close()
    logs = [(tmp_path / f"node{n}" / "out.txt").read_text() for n in (1, 0)]
    assert [proc.returncode for proc, _ in procs] == [0, 0], logs
    seen = {json.loads(p.read_text())["NODE_TAG"]: json.loads(p.read_text())
            for p in markers.glob("*.json")}  # fmt: skip
    assert seen["node1"]["rank"] == 1 and seen["node1"]["GROUP_RANK"] == "1"
    assert seen["node0"]["rank"] == 0 and seen["node0"]["sum"] == 3.0
    assert worker_processes(str(tmp_path)) == []


# ---- invalid values: exit 2, one line, naming the flag as typed ----

INVALID = [
    (["--nproc-per-node", "many"], "--nproc-per-node must be a positive integer"),
    (["--nproc_per_node", "0"], "--nproc_per_node must be a positive integer"),
    (["--nproc_per_node", "gpu"], "--nproc_per_node gpu needs a visible CUDA GPU"),
    (["--nnodes", "2:1"], "--nnodes must be N or MIN:MAX"),
    (["--nnodes", "2", "--node_rank", "5"], "--node_rank must be an integer in 0..1"),
    (["--master_addr", " "], "--master_addr must be a host name"),
    (["--master_port", "0"], "--master_port must be a port number"),
    (["--rdzv-backend", "etcd"], "--rdzv-backend must be one of 'c10d', 'static'"),
    (["--rdzv_backend", "static", "--nnodes", "1:2"], "--rdzv_backend static needs a fixed"),
    (["--rdzv_endpoint", "host"], "--rdzv_endpoint must be HOST:PORT"),
    (["--rdzv-endpoint", "h:0", "--nnodes", "2"], "--rdzv-endpoint port 0 (a free port) works"),
    (["--rdzv_id", "a/b"], "--rdzv_id must be letters"),
    (["--rdzv-conf", "join_timeout"], "--rdzv-conf must be KEY=VALUE"),
    (["--rdzv_conf", "read_timeout=soon"], "--rdzv_conf read_timeout must be an integer"),
    (["--standalone", "--nnodes", "2"], "--standalone runs one node"),
    (["--max_restarts", "-1"], "--max_restarts must be an integer >= 0"),
    (["--monitor-interval", "0"], "--monitor-interval must be a number of seconds > 0"),
    (["--monitor_interval", "nan"], "--monitor_interval must be a number of seconds > 0"),
    (["--start-method", "thread"], "--start-method must be one of 'spawn', 'fork'"),
    (["--start_method", "Spawn"], "--start_method must be one of"),
    (["--role", ""], "--role must not be empty"),
    (["--no-python", "-m"], "--no-python runs a program and cannot be combined with -m"),
    (["--run_path", "--module"], "--run_path runs a file and cannot be combined with -m"),
    (["--log-dir", "a", "--logdir", "b"], "give --logdir (the log folder) or --log-dir"),
    (["--log_dir", ""], "--log_dir must not be empty"),
    (["-r", "4"], "-r must be 0-3 (0 none, 1 stdout, 2 stderr, 3 both)"),
    (["--redirects", "0:3,x"], "--redirects must be 0-3"),
    (["--tee", "9"], "--tee must be 0-3"),  # a mistyped value, not a script named "9"
    (["-t", "1:7"], "-t must be 0-3"),
    (["--tee=5"], "--tee must be 0-3"),
    (["--local-ranks-filter", "0,a"], "--local-ranks-filter must be comma-separated"),
    (["--local_ranks_filter", ""], "--local_ranks_filter must be comma-separated"),
    (["--local-addr", ""], "--local-addr must not be empty"),
    (["--shutdown_timeout", "soon"], "--shutdown_timeout must be an integer >= 0"),
    (["--rdzv_timeout", "0"], "--rdzv_timeout must be an integer >= 1"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("args", "needle"), INVALID, ids=[" ".join(a) for a, _ in INVALID])
def test_invalid_value_exits_2_with_one_line_naming_the_flag(tmp_path: Path, args, needle) -> None:
    (tmp_path / "train.py").write_text("print('hi')\n")
    tail = [] if "-m" in args or "--module" in args else ["train.py"]
    result = subprocess.run(ddprun_argv(*args, *(tail or ["pkg"])), cwd=tmp_path,
                            env=clean_env(), capture_output=True, text=True, timeout=50)  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddprun: error: "), result.stderr
    assert needle in lines[0], lines[0]
    assert result.stdout == ""


@pytest.mark.timeout(30)
def test_an_invalid_twin_is_named(tmp_path: Path) -> None:
    script = tmp_path / "t.py"
    script.write_text("")
    for env, needle in (
        ({"DDPRUN_MONITOR_INTERVAL": "x"}, "DDPRUN_MONITOR_INTERVAL must be a number"),
        ({"DDPRUN_TEE": "maybe"}, "DDPRUN_TEE must be 1/0/true/false"),
        ({"DDPRUN_REDIRECTS": "7"}, "DDPRUN_REDIRECTS must be 0-3"),
    ):
        with pytest.raises(UsageError, match=needle):
            build_settings([str(script)], env)


# ---- meanings checked without processes ----


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--tee", "t.py", "a"], (["--tee"], "t.py", ["a"])),
        (["--tee", "3", "t.py"], (["--tee", "3"], "t.py", [])),
        (["-t", "0:3,1:1", "-r", "2", "t.py"], (["-t", "0:3,1:1", "-r", "2"], "t.py", [])),
        (["--tee", "--", "3"], (["--tee"], "3", [])),  # a script named "3"
        (["-t3", "t.py"], (["-t3"], "t.py", [])),
        (
            ["--nproc_per_node", "2", "--standalone", "t.py"],
            (["--nproc_per_node", "2", "--standalone"], "t.py", []),
        ),  # fmt: skip
    ],
)
def test_split_argv_reads_tee_values_only_when_they_are_values(argv, expected) -> None:
    assert split_argv(argv) == expected


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        # (stdout, stderr) on the console for (rank 0, local 0) and (rank 1, local 1)
        ([], [(True, True), (False, False)]),
        (["--tee"], [(True, True), (True, True)]),
        (["-t", "1:2"], [(True, True), (False, True)]),
        (["-r", "3"], [(False, False), (False, False)]),
        (["-r", "0:1"], [(False, True), (False, False)]),
        (["-r", "3", "-t", "0:1"], [(True, False), (False, False)]),  # tee wins over redirect
        (["--tee", "--local-ranks-filter", "1"], [(False, False), (True, True)]),
    ],
)
def test_console_streams_follow_torchruns_redirects_and_tee(tmp_path, args, expected) -> None:
    script = tmp_path / "t.py"
    script.write_text("")
    settings = build_settings([*args, str(script)], {})
    assert [settings.console_streams(rank, rank) for rank in (0, 1)] == expected


@pytest.mark.timeout(10)
def test_rendezvous_meanings(tmp_path: Path) -> None:
    script = str(tmp_path / "t.py")
    Path(script).write_text("")
    common = ["--nnodes", "2", "--master-addr", "h", "--master-port", "1234"]
    static = build_settings([*common, "--rdzv-backend", "static", script], {})
    assert static.fixed_node_rank == 0  # static: the node rank (default 0) is kept
    c10d = build_settings([*common, "--node-rank", "1", "--rdzv_backend", "c10d", script], {})
    assert c10d.fixed_node_rank is None  # c10d: the rendezvous orders the nodes, as torchrun
    assert build_settings([*common, "--node-rank", "1", script], {}).fixed_node_rank == 1
    conf = build_settings(["--rdzv-conf", "is_host=false,timeout=30", "--rdzv-timeout", "50",
                           script], {}).rendezvous()  # fmt: skip
    assert conf.configs["is_host"] == "false" and conf.configs["join_timeout"] == 50
    assert build_settings(["--nproc_per_node", "cpu", script], {}).nproc == flags.cpu_count()
    assert build_settings(["--local-addr", "10.1.2.3", script], {}).rendezvous().local_addr == (
        "10.1.2.3"
    )


@pytest.mark.timeout(10)
def test_help_lists_the_differences_and_hides_underscore_spellings() -> None:
    text = flags.make_parser("x").format_help()
    assert "where ddprun differs from torchrun" in text and "OMP_NUM_THREADS" in text
    assert "--nproc-per-node" in text and "--nproc_per_node N" not in text
