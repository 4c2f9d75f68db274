"""The launch recipes in launcher/: the Kubernetes manifest is well formed and its exact
command trains on one machine; the shell recipes check their input."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ddprun.distributed import find_free_port

from .conftest import Reference
from .helpers import ROOT, RUN_NODE, SCRIPT, Nodes, node_env, read_rank, wait_until, weights

MANIFEST = ROOT / "launcher" / "kubernetes" / "ddprun-job.yaml"
SBATCH = ROOT / "launcher" / "slurm" / "train.sbatch"


def _load_manifest() -> tuple[dict, dict]:
    """(Service, Job) as dicts: with PyYAML when installed, else the few fields the tests use,
    read from the text (the args list is written as a JSON-compatible flow sequence)."""
    text = MANIFEST.read_text()
    try:
        import yaml
    except ImportError:
        yaml = None
    if yaml is not None:
        docs = [doc for doc in yaml.safe_load_all(text) if doc]
        kinds = {doc["kind"]: doc for doc in docs}
        return kinds["Service"], kinds["Job"]
    service_text, job_text = text.split("\n---\n")

    def field(name: str, source: str) -> str:
        return re.search(rf"^\s*{name}:\s*(\S+)", source, re.M).group(1).strip("\"'")

    args = json.loads(re.search(r"^\s*args:\s*(\[.*?\])", job_text, re.S | re.M).group(1))
    command = json.loads(re.search(r"^\s*command:\s*(\[.*?\])", job_text, re.M).group(1))
    env = [{"name": name, "value": value} for name, value in
           re.findall(r"- name: (\w+)[^\n]*\n\s+value: \"([^\"]*)\"", job_text)]  # fmt: skip
    env += [{"name": name, "valueFrom": {}} for name in
            re.findall(r"- name: (\w+)[^\n]*\n\s+valueFrom:", job_text)]  # fmt: skip
    container = {"command": command, "args": args, "env": env,
                 "workingDir": field("workingDir", job_text),
                 "ports": [{"containerPort": int(field("containerPort", job_text))}]}  # fmt: skip
    service = {"kind": field("kind", service_text),
               "metadata": {"name": field("name", service_text)},
               "spec": {"clusterIP": field("clusterIP", service_text),
                        "ports": [{"port": int(field("port", service_text))}]}}  # fmt: skip
    job = {"kind": field("kind", job_text), "metadata": {"name": field("name", job_text)},
           "spec": {"completionMode": field("completionMode", job_text),
                    "completions": int(field("completions", job_text)),
                    "parallelism": int(field("parallelism", job_text)),
                    "template": {"spec": {"subdomain": field("subdomain", job_text),
                                          "containers": [container]}}}}  # fmt: skip
    return service, job


def _container(job: dict) -> dict:
    return job["spec"]["template"]["spec"]["containers"][0]


def _expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command and args."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), arg)


@pytest.mark.timeout(30)
def test_kubernetes_manifest_is_consistent() -> None:
    service, job = _load_manifest()
    container = _container(job)
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert service["kind"] == "Service" and service["spec"]["clusterIP"] == "None"
    assert job["kind"] == "Job" and job["spec"]["completionMode"] == "Indexed"
    low, high = map(int, env["NNODES"].split(":"))
    assert low <= high == job["spec"]["completions"] == job["spec"]["parallelism"]
    # the endpoint is pod 0's DNS name through the headless Service (the pods' subdomain)
    name, subdomain = job["metadata"]["name"], job["spec"]["template"]["spec"]["subdomain"]
    assert subdomain == service["metadata"]["name"]
    host, port = env["RDZV_ENDPOINT"].rsplit(":", 1)
    assert host == f"{name}-0.{subdomain}"
    assert int(port) == service["spec"]["ports"][0]["port"]
    assert int(port) == container["ports"][0]["containerPort"]
    assert container["command"] == ["ddprun"]
    args = container["args"]
    assert args[args.index("--nnodes") + 1] == "$(NNODES)"
    assert args[args.index("--rdzv-endpoint") + 1] == "$(RDZV_ENDPOINT)"
    used = set(re.findall(r"\$\((\w+)\)", " ".join(args)))
    assert used <= set(env), f"args use undefined variables: {used - set(env)}"


@pytest.mark.timeout(120)
def test_kubernetes_command_trains_on_one_machine(tmp_path: Path, reference: Reference) -> None:
    _, job = _load_manifest()
    container = _container(job)
    env = {item["name"]: item.get("value") or "" for item in container["env"]}
    assert env["NNODES"] == "1:2"
    # The manifest's command, with this machine for the cluster: pod 0 on 127.0.0.1.
    env.update(RDZV_ENDPOINT=f"127.0.0.1:{find_free_port()}", RUN_DIR=str(tmp_path / "shared"))
    workdir = tmp_path / "workspace"  # the image's workingDir, holding train.py
    workdir.mkdir()
    shutil.copy(SCRIPT, workdir / "train.py")
    assert container["command"] == ["ddprun"]
    with Nodes(tmp_path) as nodes:
        for pod in range(2):
            pod_env = {**env, "POD_NAME": f"ddprun-train-{pod}-abcde"}
            args = [_expand(arg, pod_env) for arg in container["args"]]
            nodes.start(f"pod{pod}", [sys.executable, "-m", "ddprun", *args],
                        env=node_env(), cwd=workdir)  # fmt: skip
        codes = [node.wait(90) for node in nodes.nodes]
        assert codes == [0, 0], nodes.output
        assert wait_until(lambda: nodes.workers() == [], 10), nodes.workers()
    out = tmp_path / "shared" / "final"
    assert sorted(read_rank(out, rank)["WORLD_SIZE"] for rank in (0, 1)) == ["2", "2"]
    for rank in (0, 1):  # same world size, same data, same order: the reference's weights
        assert weights(out, rank) == weights(reference.out, rank)
    assert (tmp_path / "shared" / "checkpoints" / "last.pth").is_file()
    assert sorted(p.name for p in (tmp_path / "shared" / "launcher").iterdir()) == [
        "ddprun-train-0-abcde",
        "ddprun-train-1-abcde",
    ]


@pytest.mark.timeout(30)
def test_run_node_sh_names_what_is_missing(tmp_path: Path) -> None:
    result = subprocess.run(["bash", str(RUN_NODE), str(SCRIPT)], capture_output=True,
                            text=True, env=node_env(NNODES="2", NODE_RANK="0"), timeout=20)  # fmt: skip
    assert result.returncode != 0 and "MASTER_ADDR" in result.stderr
    result = subprocess.run(["bash", str(RUN_NODE)], capture_output=True, text=True, timeout=20,
                            env=node_env(MASTER_ADDR="h", NNODES="2", NODE_RANK="0"))  # fmt: skip
    assert result.returncode == 2 and "usage:" in result.stderr


@pytest.mark.timeout(30)
def test_sbatch_script_is_valid_bash_and_asks_for_a_script() -> None:
    assert subprocess.run(["bash", "-n", str(SBATCH)], timeout=10).returncode == 0
    result = subprocess.run(["bash", str(SBATCH)], capture_output=True, text=True, timeout=10,
                            env=node_env(SLURM_JOB_ID="1"))  # fmt: skip
    assert result.returncode == 2 and "usage:" in result.stderr
    text = SBATCH.read_text()
    for needle in ("#SBATCH --ntasks-per-node=1", "#SBATCH --signal=B:USR1@", "#SBATCH --requeue",
                   "scontrol requeue", "srun "):  # fmt: skip
        assert needle in text
