"""Shared helpers for the real-workload tests: real processes, always cleaned up."""

from __future__ import annotations

import functools
from pathlib import Path

from tests.distributed import conftest
from tests.distributed.conftest import assert_metrics_close, load_metrics, run  # noqa: F401

SCRIPTS = Path(__file__).parent / "scripts"

#: argv for tests/workloads/scripts/<name>.py with plain python / through the real ddprun CLI
script = functools.partial(conftest.script, folder=SCRIPTS)
ddprun = functools.partial(conftest.ddprun, folder=SCRIPTS)
