"""Fault injection in one process (issue 4, items 8 and 9): scripts/train.py's `main` runs here
with DeviceEngine. Bad input must fail with a message that names the culprit, and lose nothing;
a run crashed mid-epoch and resumed from last.pth must end exactly where the uninterrupted run
ends.

The launcher's own bad input (missing script, bad --nproc, port out of range: exit 2 and one
line) is covered by tests/launcher/test_cli.py::test_cli_exits_2_with_one_line_and_no_traceback
and ::test_invalid_values_raise_one_clear_message.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from ddprun.checkpoint import CheckpointError, load_checkpoint

from .helpers import assert_same_weights, batches_of, csv_rows, load_script

# One process, batch 16: 16 train batches per epoch. The crash is in epoch 2 at its 5th batch
# (global 21); last.pth every 3 batches was written at its 3rd (global 19).
CRASH_AT, SAVED_AT, LAST_BATCH = 21, 19, 48


@pytest.fixture(scope="module")
def train():
    """`main(argv)` of scripts/train.py on the DeviceEngine; torch's thread count restored."""
    script, threads = load_script(), torch.get_num_threads()

    def run(logdir: Path, *args: str):
        return script.main(["--engine", "device", "--logdir", str(logdir), *args])

    yield run
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(train, tmp_path_factory: pytest.TempPathFactory) -> Path:
    logdir = tmp_path_factory.mktemp("inprocess") / "reference"
    train(logdir)
    return logdir


@pytest.fixture(scope="module")
def resumed(train, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Crashed at batch CRASH_AT (last.pth every 3 batches), then resumed from last.pth."""
    logdir = tmp_path_factory.mktemp("inprocess") / "resumed"
    crash = ("--fault", "raise", "--fault-rank", "0", "--fault-batch", str(CRASH_AT))
    with pytest.raises(RuntimeError, match=f"injected fault at batch {CRASH_AT}"):
        train(logdir, "--save-every", "3", *crash)
    assert load_checkpoint(logdir / "checkpoints" / "last.pth")["global_batch_step"] == SAVED_AT
    train(logdir, "--save-every", "3", "--resume", str(logdir / "checkpoints" / "last.pth"))
    return logdir


# ----------------------------------------------------------- 9. mid-epoch resume
@pytest.mark.timeout(60)
def test_mid_epoch_resume_gives_the_uninterrupted_weights(reference, resumed):
    first, second = _runs(resumed)
    assert first == list(range(1, CRASH_AT))
    assert second == list(range(SAVED_AT + 1, LAST_BATCH + 1))  # continues after the save
    assert [row["step"] for row in csv_rows(resumed, "valid")] == [1, 2, 3]
    assert_same_weights(reference, resumed)


@pytest.mark.timeout(60)
def test_mid_epoch_resume_gives_the_uninterrupted_epoch_metrics(reference, resumed):
    assert csv_rows(resumed, "valid") == csv_rows(reference, "valid")
    assert csv_rows(resumed, "train") == csv_rows(reference, "train")


def _runs(logdir: Path) -> list[list[int]]:
    """The batches of each run in the progress file (split at its 'attempt' lines, which are
    all 'attempt 0' in-process)."""
    runs: list[list[int]] = []
    for line in (logdir / "progress_rank0.txt").read_text().splitlines():
        if line.startswith("attempt"):
            runs.append([])
        else:
            runs[-1].append(int(line.split()[-1]))
    return runs


# ------------------------------------------------------------------ 8. bad input
@pytest.mark.timeout(60)
def test_unknown_key_in_load_on_stage_start_is_named_before_anything_runs(train, tmp_path):
    spec = json.dumps({"modle": "best", "optimizer": "last"})
    with pytest.raises(
        ValueError, match=r"load_on_stage_start: unknown load target\(s\) \['modle'\]"
    ) as info:
        train(tmp_path / "run", "--load-on-stage-start", spec)
    assert "'model'" in str(info.value)  # lists what is expected
    assert list((tmp_path / "run").iterdir()) == []  # nothing ran, nothing written


@pytest.mark.timeout(60)
def test_missing_selection_metric_names_it_and_lists_the_available_ones(train, reference, tmp_path):
    logdir = tmp_path / "run"
    with pytest.raises(KeyError) as info:
        train(logdir, "--metric-key", "los", "--save-every", "4")
    message = str(info.value)
    assert "'los'" in message and "CheckpointCallback" in message
    assert re.search(r"available: \[.*'accuracy01'.*'loss'.*\]", message), message
    assert batches_of(logdir, 0, attempt=0)[-1] == 16  # raised at the first epoch end
    # nothing lost: last.pth of the epoch's last train batch resumes with the key fixed
    train(logdir, "--save-every", "4", "--resume", "auto")
    assert_same_weights(reference, logdir)


@pytest.mark.timeout(60)
def test_mismatched_state_dict_names_file_and_component_and_loses_nothing(
    train, reference, tmp_path
):
    logdir = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", logdir / "checkpoints")
    before = {p.name: p.read_bytes() for p in (logdir / "checkpoints").iterdir()}
    last = logdir / "checkpoints" / "last.pth"
    with pytest.raises(CheckpointError) as info:
        train(logdir, "--hidden", "32", "--resume", "auto")  # a wider model than was saved
    message = str(info.value)
    assert str(last) in message and "saved model state does not fit the model" in message
    assert "size mismatch" in message  # torch's detail, naming the keys
    after = {p.name: p.read_bytes() for p in (logdir / "checkpoints").iterdir()}
    assert after == before  # nothing overwritten or deleted
