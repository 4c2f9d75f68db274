"""The single-node reference run every multi-node layout is compared with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from .helpers import DDPRUN, SCRIPT, Nodes, node_env

EPOCHS = 3


@dataclass(frozen=True)
class Reference:
    logdir: Path  # checkpoints/ and logs/ of the run
    out: Path  # rank<R>.json of every rank


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """`ddprun --nproc 2` on one node: world size 2, the layout the others must match."""
    folder = tmp_path_factory.mktemp("reference")
    logdir, out = folder / "run", folder / "out"
    with Nodes(folder) as nodes:
        node = nodes.start(
            "single",
            [*DDPRUN, "--nproc", "2", "--logdir", folder / "launcher", SCRIPT,
             "--logdir", logdir, "--out", out, "--epochs", str(EPOCHS)],
            env=node_env(),
        )  # fmt: skip
        assert node.wait(90) == 0, nodes.output
    return Reference(logdir, out)
