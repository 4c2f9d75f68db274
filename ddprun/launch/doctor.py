"""``ddprun doctor``: the preflight to run when a job will not start.

It checks, in order, and prints one line per finding:

1. versions: ddprun, torch, Python, and the process-group backends this torch has (gloo, NCCL,
   MPI);
2. devices: ``CUDA_VISIBLE_DEVICES``, the GPUs torch sees, the CPU cores;
3. network: what this machine's name resolves to and on which interface. That is the address
   other nodes would use: torch's rendezvous hands node 0's name (or ``--local-addr``) to the
   workers as MASTER_ADDR, and gloo binds the address the name resolves to unless
   ``GLOO_SOCKET_IFNAME`` names an interface. A name that resolves to loopback only is fine
   on one machine and a problem when another node is involved (a non-loopback endpoint).
   ``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME`` must name interfaces that exist;
4. reachability, when ``--rdzv-endpoint`` or ``--master-addr``/``--master-port`` (or their
   ``DDPRUN_*`` twins) is given: one TCP connect with a short timeout (``--connect-timeout``).
   The master address without a port means ddprun's multi-node default, 29500; port 0 (a free
   port picked at launch) has nothing to check;
5. a 2-process all-reduce on each available backend: two real processes on this machine meet
   in a TCPStore this process hosts on 127.0.0.1, initialise the backend as a job would
   (same environment) and sum 1 + 2; gloo on the CPU, NCCL on GPUs 0 and 1 when two are
   visible. They are killed after ``--timeout`` seconds (the probe: `doctor_allreduce.py`).

Exit 0 when nothing is wrong. Otherwise exit 1 after one line per problem on stderr, each
with its fix (``ddprun doctor: problem: ...; fix: ...``). Invalid arguments exit 2.

``doctor`` is a subcommand only as ddprun's very first argument (``ddprun doctor``); a script
named ``doctor`` runs with ``ddprun ./doctor`` or ``ddprun -- doctor``.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import platform
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from ddprun import __version__
from ddprun.launch import flags as fl
from ddprun.launch import values as va
from ddprun.launch.doctor_allreduce import run_allreduce, worker_main
from ddprun.launch.values import UsageError

__all__ = ["Report", "check_reachable", "main"]

#: Where ddprun's multi-node rendezvous listens when only the master address is given.
DEFAULT_MASTER_PORT = 29500


@dataclass
class Report:
    """What the doctor found: lines are printed at once, problems (with fixes) collected."""

    problems: list[str] = field(default_factory=list)

    def say(self, topic: str, text: str) -> None:
        print(f"{topic:<11}{text}", flush=True)

    def problem(self, what: str, fix: str) -> None:
        self.problems.append(f"{what}; fix: {fix}")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ddprun doctor",
        allow_abbrev=False,
        description="Check versions, devices, network, the rendezvous endpoint and a 2-process "
        "all-reduce on each backend. Exit 0 when all is well, else 1 with one line per problem "
        "and its fix.",
    )
    for names, dest, help_text in (
        (("--rdzv-endpoint", "--rdzv_endpoint"), "rdzv_endpoint", "HOST:PORT to try to reach"),
        (("--master-addr", "--master_addr"), "master_addr", "node 0's address to try to reach"),
        (("--master-port", "--master_port"), "master_port", "with --master-addr (default 29500)"),
    ):
        parser.add_argument(*names, dest=dest, help=help_text)
    parser.add_argument("--connect-timeout", default="3", help="seconds for the TCP connect")
    parser.add_argument("--timeout", default="60", help="seconds for each all-reduce test")
    return parser


def _target(args: argparse.Namespace, env: Mapping[str, str]) -> tuple[str, str, int] | None:
    """(flag, host, port) to check: the flags, else their DDPRUN_* twins; None if neither."""

    def given(name: str) -> tuple[str | None, str]:
        value = getattr(args, name)
        twin = "DDPRUN_" + name.upper()
        return (value, "--" + name.replace("_", "-")) if value else (env.get(twin), twin)

    endpoint, source = given("rdzv_endpoint")
    if endpoint:
        host, _, port = va.parse_endpoint(endpoint, source).rpartition(":")
        return "--rdzv-endpoint", host.strip("[]"), int(port)
    (addr, addr_source), (port_text, port_source) = given("master_addr"), given("master_port")
    if not addr and not port_text:
        return None
    port = va.parse_port(port_text, port_source) if port_text else DEFAULT_MASTER_PORT
    return "--master-addr/--master-port", va.parse_text(addr or "127.0.0.1", addr_source), port


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return address == "localhost"


def _resolve(name: str) -> list[str]:
    """The addresses `name` resolves to, IPv4 first, without duplicates; [] if it does not."""
    try:
        infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except OSError:
        return []
    found = [info[4][0] for info in sorted(infos, key=lambda info: info[0] != socket.AF_INET)]
    return list(dict.fromkeys(found))


def _interfaces() -> dict[str, list[str]]:
    """Interface name -> its IPv4/IPv6 addresses."""
    import psutil

    families = (socket.AF_INET, socket.AF_INET6)
    return {
        name: [entry.address.split("%")[0] for entry in entries if entry.family in families]
        for name, entries in psutil.net_if_addrs().items()
    }


def _interface_of(address: str, interfaces: Mapping[str, list[str]]) -> str | None:
    return next((name for name, addrs in interfaces.items() if address in addrs), None)


def check_versions(report: Report) -> list[str]:
    """Versions and backends; returns the backends an all-reduce can be tried on."""
    import torch
    import torch.distributed as dist

    report.say("versions", f"ddprun {__version__}, torch {torch.__version__}, Python "
               f"{platform.python_version()} ({platform.platform(terse=True)})")  # fmt: skip
    if not dist.is_available():
        report.say("backends", "none: this torch has no torch.distributed")
        report.problem("this torch build has no torch.distributed",
                       "install a torch build with distributed support (pip install torch)")  # fmt: skip
        return []
    cuda = torch.version.cuda
    nccl = dist.is_nccl_available()
    nccl_text = f"yes (NCCL {'.'.join(map(str, torch.cuda.nccl.version()))})" if nccl else (
        "no" + ("" if cuda else " (this torch has no CUDA)"))  # fmt: skip
    gloo = dist.is_gloo_available()
    report.say("backends", f"gloo: {'yes' if gloo else 'no'}; nccl: {nccl_text}; "
               f"mpi: {'yes' if dist.is_mpi_available() else 'no'}")  # fmt: skip
    if not gloo:
        report.problem("this torch has no gloo backend (ddprun's CPU backend)",
                       "install an official torch build, which includes gloo")  # fmt: skip
    return [name for name, ok in (("gloo", gloo), ("nccl", nccl)) if ok]


def check_devices(report: Report) -> int:
    """GPUs and cores; returns the number of visible GPUs."""
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible_text = "unset" if visible is None else repr(visible)
    gpus = torch.cuda.device_count() if torch.version.cuda else 0
    if gpus:
        names = ", ".join(f"{i}: {torch.cuda.get_device_name(i)}" for i in range(gpus))
        gpu_text = f"{gpus} GPU(s) ({names})"
    else:
        gpu_text = "no GPU" + ("" if torch.version.cuda else " (this torch has no CUDA)")
    report.say("devices", f"{gpu_text}; CUDA_VISIBLE_DEVICES {visible_text}; "
               f"{fl.cpu_count()} CPU cores")  # fmt: skip
    if torch.version.cuda and visible and visible.strip() not in ("-1", "") and not gpus:
        report.problem(f"CUDA_VISIBLE_DEVICES={visible} but torch sees no GPU",
                       "check the driver with nvidia-smi and that those GPU ids exist, "
                       "or unset CUDA_VISIBLE_DEVICES")  # fmt: skip
    return gpus


def check_network(report: Report, remote: bool) -> None:
    """The address this machine is known by, and the *_SOCKET_IFNAME variables."""
    interfaces = _interfaces()
    host, fqdn = socket.gethostname(), socket.getfqdn()
    addresses = _resolve(host)
    where = ", ".join(f"{addr} ({_interface_of(addr, interfaces) or '?'})" for addr in addresses)
    others = [(name, addr) for name, addrs in interfaces.items() for addr in addrs
              if not _is_loopback(addr) and ":" not in addr]  # fmt: skip
    hint = (f"GLOO_SOCKET_IFNAME={others[0][0]} and --local-addr {others[0][1]}" if others
            else "GLOO_SOCKET_IFNAME and --local-addr")  # fmt: skip
    if not addresses:
        report.say("network", f"host {host} (fqdn {fqdn}) does not resolve")
        report.problem(f"this machine's name {host!r} does not resolve to an address",
                       f"add it to /etc/hosts or DNS, or set {hint}")  # fmt: skip
    elif all(map(_is_loopback, addresses)):
        report.say("network", f"host {host} (fqdn {fqdn}) -> {where}: loopback only, so other "
                   f"nodes cannot reach this one by name (fine on one machine)")  # fmt: skip
        if remote:
            report.problem(f"this machine's name {host!r} resolves to loopback only ({where}): "
                           "other nodes cannot reach its workers",
                           f"map the name to its network address in /etc/hosts, or set {hint}")  # fmt: skip
    else:
        report.say("network", f"host {host} (fqdn {fqdn}) -> {where}: the address other nodes "
                   "would use")  # fmt: skip
    for variable in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        _check_ifname(report, variable, interfaces)


def _check_ifname(report: Report, variable: str, interfaces: Mapping[str, list[str]]) -> None:
    value = os.environ.get(variable)
    if not value:
        return
    names = [name.strip() for name in value.split(",") if name.strip()]
    if variable.startswith("NCCL"):  # NCCL: prefixes, "=" exact names, "^" exclusions
        if value.startswith("^"):
            return
        exact = value.startswith("=")
        names = [name.lstrip("=") for name in names]
        found = [
            n for n in names if any(i == n or (not exact and i.startswith(n)) for i in interfaces)
        ]
    else:
        found = [name for name in names if name in interfaces]
    report.say("", f"{variable}={value}")
    if len(found) < (1 if variable.startswith("NCCL") else len(names)):
        report.problem(f"{variable}={value} names no interface of this machine "
                       f"(it has: {', '.join(sorted(interfaces))})",
                       f"set {variable} to one of those, or unset it")  # fmt: skip


def check_reachable(host: str, port: int, timeout: float) -> tuple[str | None, float]:
    """Try one TCP connect; return (None, seconds) when it worked, else (why, seconds)."""
    start = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None, time.monotonic() - start
    except socket.gaierror as exc:
        why = f"cannot resolve {host!r} ({exc.strerror})"
    except TimeoutError:
        why = f"no answer from {host}:{port} within {timeout:g} s"
    except ConnectionRefusedError:
        why = f"nothing listens on {host}:{port} (connection refused)"
    except OSError as exc:
        why = f"cannot reach {host}:{port} ({exc.strerror or exc})"
    return why, time.monotonic() - start


def _fix_for(why: str, flag: str) -> str:
    if why.startswith("cannot resolve"):
        return "use node 0's IP address, or add its name to DNS or /etc/hosts"
    if "connection refused" in why:
        return (f"start ddprun on node 0 first (it hosts the rendezvous there) and give every "
                f"node the same {flag}")  # fmt: skip
    if why.startswith("no answer"):
        return "check the address, and that node 0's firewall lets this port in"
    return "check the address and this machine's route to it"


def check_target(report: Report, target: tuple[str, str, int], timeout: float) -> None:
    flag, host, port = target
    shown = va.join_host_port(host, port)
    if port == 0:
        report.say("reach", f"{shown}: port 0 picks a free port at launch; nothing to check")
        return
    why, seconds = check_reachable(host, port, timeout)
    if why is None:
        report.say("reach", f"{shown}: reachable ({seconds * 1000:.1f} ms)")
        return
    report.say("reach", f"{shown}: NOT reachable: {why}")
    report.problem(f"{flag} {shown}: {why}", _fix_for(why, flag))


def check_allreduce(report: Report, backends: Sequence[str], gpus: int, timeout: float) -> None:
    fixes = {
        "gloo": "set GLOO_SOCKET_IFNAME to the interface holding this machine's address (see "
        "network; GLOO_SOCKET_IFNAME=lo on one machine) or fix the name in /etc/hosts",
        "nccl": "run with NCCL_DEBUG=INFO to see why; check NCCL_SOCKET_IFNAME and the GPUs",
    }
    for backend in ("gloo", "nccl"):
        if backend not in backends:
            report.say("all-reduce", f"{backend}: skipped (not available)")
            continue
        if backend == "nccl" and gpus < 2:
            report.say("all-reduce", f"nccl: skipped (needs 2 GPUs, {gpus} visible)")
            continue
        why, seconds = run_allreduce(backend, timeout)
        if why is None:
            done = f"{backend}: ok, 2 processes summed 1 + 2 = 3 in {seconds:.1f} s"
            report.say("all-reduce", done)
        else:
            slow = "raise --timeout if this machine is slow, else " if "within" in why else ""
            report.say("all-reduce", f"{backend}: FAILED: {why}")
            report.problem(f"{backend} all-reduce between 2 local processes: {why}",
                           slow + fixes[backend])  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``ddprun doctor``; return 0 when all is well, 1 with problems, 2 on bad arguments."""
    try:
        args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
        target = _target(args, os.environ)
        connect_timeout = va.positive_seconds(args.connect_timeout, "--connect-timeout")
        timeout = va.positive_seconds(args.timeout, "--timeout")
    except UsageError as exc:
        print(f"ddprun doctor: error: {exc}", file=sys.stderr)
        return 2
    report = Report()
    print("ddprun doctor", flush=True)
    backends = check_versions(report)
    gpus = check_devices(report)
    check_network(report, remote=target is not None and not _is_loopback_host(target[1]))
    if target is not None:
        check_target(report, target, connect_timeout)
    check_allreduce(report, backends, gpus, timeout)
    if not report.problems:
        report.say("result", "ok: no problem found")
        return 0
    report.say("result", f"{len(report.problems)} problem(s), listed on stderr")
    for problem in report.problems:
        print(f"ddprun doctor: problem: {problem}", file=sys.stderr, flush=True)
    return 1


def _is_loopback_host(host: str) -> bool:
    addresses = _resolve(host)
    return bool(addresses) and all(map(_is_loopback, addresses))


def _entry(argv: Sequence[str]) -> Any:
    if argv[:1] == ["_worker"]:
        worker_main(argv[1:])
    return main(argv)


if __name__ == "__main__":
    sys.exit(_entry(sys.argv[1:]))
