"""Real ddprun runs over 127.0.0.1: output routing, arguments, modules, failures, restarts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .helpers import launched, read_output, run_ddprun, worker_processes, write_script

HELLO = """\
dist.init_process_group(backend="gloo")
t = torch.ones(1)
dist.all_reduce(t)
print(f"out-from-{RANK} world={int(t.item())} args={sys.argv[1:]}", flush=True)
print(f"err-from-{RANK} omp={os.environ['OMP_NUM_THREADS']} backend={os.environ.get('DDPRUN_BACKEND')}", file=sys.stderr)
"""


@pytest.mark.timeout(60)
def test_two_ranks_rank0_on_console_every_rank_in_its_log(tmp_path: Path) -> None:
    script = write_script(tmp_path, "hello.py", HELLO)
    logs = tmp_path / "logs"
    result = run_ddprun(tmp_path, "--nproc", "2", "--backend", "gloo", "--logdir", logs, script)
    assert result.returncode == 0, result.output
    assert "out-from-0 world=2" in result.stdout and "err-from-0" in result.stderr
    assert "from-1" not in result.output
    assert "backend=gloo" in result.stderr and "omp=1" in result.stderr  # 2 cores // 2 workers
    for rank in (0, 1):
        text = (logs / "ranks" / f"rank{rank}.log").read_text()
        assert f"out-from-{rank} world=2" in text and f"err-from-{rank}" in text
    assert worker_processes(str(tmp_path)) == []


@pytest.mark.timeout(60)
def test_script_arguments_pass_through_untouched(tmp_path: Path) -> None:
    script = write_script(tmp_path, "hello.py", HELLO)
    args = ["--lr", "0.1", "-x", "--nproc", "9", "--", "a$$b${local_rank}", "--help"]
    result = run_ddprun(tmp_path, "--nproc", "2", "--logdir", tmp_path / "logs", script, *args)
    assert result.returncode == 0, result.output
    assert f"args={args}" in result.stdout


@pytest.mark.timeout(60)
def test_module_mode_runs_a_package_module_like_python_m(tmp_path: Path) -> None:
    package = tmp_path / "mypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    write_script(package, "main.py", HELLO + 'print("name", __name__, flush=True)\n')
    result = run_ddprun(
        tmp_path, "--nproc", "2", "--logdir", tmp_path / "logs", "-m", "mypkg.main", "-m", "x"
    )
    assert result.returncode == 0, result.output
    assert "args=['-m', 'x']" in result.stdout and "name __main__" in result.stdout


FAIL = """\
dist.init_process_group(backend="gloo")
if RANK == 1:
    raise ValueError("boom" + "-from-rank-" + str(RANK))
t = torch.ones(1)
dist.all_reduce(t)  # rank 0 waits here until rank 1 is gone
time.sleep(60)
"""


@pytest.mark.timeout(60)
def test_failing_rank_stops_the_rest_and_is_reported_once(tmp_path: Path) -> None:
    script = write_script(tmp_path, "fail.py", FAIL)
    logs = tmp_path / "logs"
    result = run_ddprun(tmp_path, "--nproc", "2", "--logdir", logs, script)
    assert result.returncode == 1
    assert result.seconds < 25, result.seconds
    assert result.output.count("boom-from-rank-1") == 1, result.output
    assert len(re.findall(r"\brank 1\b", result.output)) == 1, result.output
    assert "Traceback" in result.stderr and "fail.py" in result.stderr
    assert "ChildFailedError" not in result.output and "torch/distributed" not in result.output
    assert "boom-from-rank-1" in (logs / "ranks" / "rank1.log").read_text()
    assert worker_processes(str(tmp_path)) == []


@pytest.mark.timeout(90)
def test_four_workers_on_two_cores(tmp_path: Path) -> None:
    script = write_script(tmp_path, "hello.py", HELLO)
    result = run_ddprun(tmp_path, "--nproc", "4", "--logdir", tmp_path / "logs", script, timeout=80)
    assert result.returncode == 0, result.output
    assert "out-from-0 world=4" in result.stdout
    assert sorted(p.name for p in (tmp_path / "logs" / "ranks").iterdir()) == [
        f"rank{r}.log" for r in range(4)
    ]


@pytest.mark.timeout(90)
def test_two_jobs_at_once_get_their_own_ports(tmp_path: Path) -> None:
    script = write_script(tmp_path, "hello.py", HELLO)
    jobs = [tmp_path / "a", tmp_path / "b"]
    for job in jobs:
        job.mkdir()
    with launched(jobs[0], "--nproc", "2", "--logdir", jobs[0] / "logs", script) as first:
        with launched(jobs[1], "--nproc", "2", "--logdir", jobs[1] / "logs", script) as second:
            codes = [first.wait(80), second.wait(80)]
    assert codes == [0, 0], [read_output(job) for job in jobs]


RESTART = """\
attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
print(f"attempt-{attempt}-rank-{RANK}", flush=True)
dist.init_process_group(backend="gloo")
if attempt == 0 and RANK == 1:
    raise RuntimeError("first attempt fails")
t = torch.ones(1)
dist.all_reduce(t)
print(f"done-{attempt}-rank-{RANK}", flush=True)
"""


@pytest.mark.timeout(90)
def test_max_restarts_restarts_the_group_and_logs_keep_every_attempt(tmp_path: Path) -> None:
    script = write_script(tmp_path, "restart.py", RESTART)
    logs = tmp_path / "logs"
    result = run_ddprun(
        tmp_path, "--nproc", "2", "--max-restarts", "1", "--logdir", logs, script, timeout=80
    )
    assert result.returncode == 0, result.output
    assert "restarting all of them (restart 1 of 1)" in result.stderr
    rank1 = (logs / "ranks" / "rank1.log").read_text()
    assert "attempt-0-rank-1" in rank1 and "first attempt fails" in rank1
    assert "attempt-1-rank-1" in rank1 and "done-1-rank-1" in rank1
    assert rank1.index("attempt-0-rank-1") < rank1.index("attempt-1-rank-1")
    assert "done-1-rank-0" in result.stdout


@pytest.mark.timeout(60)
def test_without_restarts_a_failure_is_final(tmp_path: Path) -> None:
    script = write_script(tmp_path, "restart.py", RESTART)
    result = run_ddprun(tmp_path, "--nproc", "2", "--logdir", tmp_path / "logs", script)
    assert result.returncode == 1
    assert "RuntimeError: first attempt fails" in result.stderr
    assert "restarting" not in result.stderr


@pytest.mark.timeout(90)
def test_two_nodes_on_one_machine_form_one_world(tmp_path: Path) -> None:
    from ddprun.distributed import find_free_port

    script = write_script(tmp_path, "hello.py", HELLO)
    port = str(find_free_port())
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    common = ["--nproc", "2", "--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", port]
    for node in nodes:
        node.mkdir()
    with launched(
        nodes[0], *common, "--node-rank", "0", "--logdir", nodes[0] / "logs", script
    ) as a:
        with launched(
            nodes[1], *common, "--node-rank", "1", "--logdir", nodes[1] / "logs", script
        ) as b:
            codes = [a.wait(80), b.wait(80)]
    outputs = [read_output(node) for node in nodes]
    assert codes == [0, 0], outputs
    assert "out-from-0 world=4" in outputs[0][0] + outputs[1][0]
    logs = sorted(p.name for node in nodes for p in (node / "logs" / "ranks").iterdir())
    assert logs == ["rank0.log", "rank1.log", "rank2.log", "rank3.log"]
