"""The defaults the core adds by role (ddprun.defaults), the one-process engines from the
engines' factory, and the import arrows that keep concrete plug-ins out of the core."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddprun import callbacks, defaults, dl, loggers
from ddprun.engines.factory import single_process_engine

CORE = Path(__file__).resolve().parents[2] / "ddprun" / "core"


@pytest.mark.parametrize(
    ("role", "expected"),
    [
        ("criterion", callbacks.CriterionCallback),
        ("optimizer", callbacks.OptimizerCallback),
        ("scheduler", callbacks.SchedulerCallback),
        ("checkpoint", callbacks.CheckpointCallback),
        ("progress", callbacks.TqdmCallback),
        ("timer", callbacks.TimerCallback),
        ("check", callbacks.CheckRunCallback),
        ("overfit", callbacks.BatchOverfitCallback),
    ],
)
def test_callback_roles_name_the_classes(role: str, expected: type) -> None:
    assert defaults.callback_class(role) is expected


def test_logger_roles_and_unknown_roles() -> None:
    assert defaults.logger_class("console") is loggers.ConsoleLogger
    assert defaults.logger_class("csv") is loggers.CSVLogger
    assert defaults.logger_class("tensorboard") is loggers.TensorboardLogger
    with pytest.raises(KeyError, match="no default callback for role 'nope'"):
        defaults.callback_class("nope")  # type: ignore[arg-type]


def test_has_callback_sees_through_control_flow_wrappers() -> None:
    wrapped = dl.ControlFlowCallback(dl.TimerCallback(), epochs=[1])
    assert defaults.has_callback({"t": wrapped}, "timer") is True
    assert defaults.has_callback({"t": wrapped}, "progress") is False
    assert defaults.has_callback({}, "timer") is False


def test_console_and_logdir_loggers(tmp_path: Path) -> None:
    console = defaults.console_loggers()
    assert list(console) == ["console"] and isinstance(console["console"], loggers.ConsoleLogger)
    assert defaults.with_logdir_loggers(console, None) == console
    added = defaults.with_logdir_loggers(console, tmp_path)
    assert list(added) == ["console", "_csv", "_tensorboard"]
    assert isinstance(added["_csv"], loggers.CSVLogger)
    assert isinstance(added["_tensorboard"], loggers.TensorboardLogger)
    own = {"mine": loggers.CSVLogger(logdir=tmp_path)}
    assert list(defaults.with_logdir_loggers(own, tmp_path)) == ["mine", "_tensorboard"]


def test_single_process_engine() -> None:
    plain = single_process_engine("cpu")
    assert type(plain) is dl.DeviceEngine and plain.device == torch.device("cpu")
    amp = single_process_engine("cpu", amp=True, dtype=torch.bfloat16)
    assert type(amp) is dl.AMPEngine and amp.precision.dtype == torch.bfloat16


def _plugin_imports(path: Path) -> list[str]:
    """Modules of concrete engines, callbacks or loggers that `path` imports (anywhere)."""
    allowed = ("ddprun.engines.factory", "ddprun.engines.engine", "ddprun.engines.precision")
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            plugin = name.startswith(("ddprun.callbacks", "ddprun.loggers", "ddprun.engines"))
            if plugin and not name.startswith(allowed) and name != "ddprun.engines":
                found.append(f"{path.name}:{node.lineno}: {name}")
    return found


def test_core_imports_plugins_only_through_defaults_and_the_factory() -> None:
    offenders = [hit for path in sorted(CORE.glob("*.py")) for hit in _plugin_imports(path)]
    assert offenders == []


def test_importing_the_core_loads_no_callbacks_or_loggers() -> None:
    code = (
        "import sys, ddprun.core.runner_train, ddprun.core.supervised, ddprun.core.config_runner;"
        "print(sorted(m for m in ('ddprun.callbacks', 'ddprun.loggers') if m in sys.modules))"
    )
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "[]"
