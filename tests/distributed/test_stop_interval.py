"""The stop agreement's interval follows the step time and is agreed: every rank checks, and
stops, at the same batch (real gloo processes through the real CLI)."""

from __future__ import annotations

import json
import signal

import pytest

from tests.distributed.conftest import ddprun, run

pytestmark = pytest.mark.timeout(180)


def _ranks(folder):
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_ranks_agree_at_the_same_batches_while_proposals_differ(tmp_path):
    result = run(ddprun(2, "stop_interval", "--out", str(tmp_path)), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = _ranks(tmp_path)
    batches0 = [a[0] for a in rank0["agreements"]]
    assert batches0 == [a[0] for a in rank1["agreements"]]
    # rank 1 aims at twice rank 0's interval: the proposals differ, the answers do not
    proposals0 = [a[1] for a in rank0["agreements"]]
    proposals1 = [a[1] for a in rank1["agreements"]]
    assert sum(p1 > p0 for p0, p1 in zip(proposals0, proposals1)) >= len(proposals0) // 2
    answers = [a[3] for a in rank0["agreements"]]
    assert answers == [a[3] for a in rank1["agreements"]]
    # an answer is the larger proposal of the agreement before it (none at the first
    # agreement of each train loader: the one in flight was drained at the loader end)
    assert [i for i, answer in enumerate(answers) if answer is None][:1] == [0]
    assert answers.count(None) <= 2
    for i, answer in enumerate(answers):
        if answer is not None:
            assert answer == max(proposals0[i - 1], proposals1[i - 1])
            # the next agreement comes that many batches later, on every rank
            if i + 1 < len(batches0):
                assert batches0[i + 1] - batches0[i] == answer
    assert all(1 <= p <= 32 for p in proposals0 + proposals1)
    # slow steps (>= 4 ms, rank 0 aiming at 50 ms) give short intervals, not the cap
    assert min(proposals0) < 16
    assert rank0["global_batch_step"] == rank1["global_batch_step"] == 128


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_batch(tmp_path):
    result = run(ddprun(2, "stop_interval", "--out", str(tmp_path), "--signal-at", "20"), tmp_path)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
    rank0, rank1 = _ranks(tmp_path)
    assert rank0["global_batch_step"] == rank1["global_batch_step"]
    stopped_at = rank0["global_batch_step"]
    # within the agreed interval (at most 32 batches) plus one pipelined agreement
    assert 20 < stopped_at <= 20 + 2 * 32
    assert stopped_at < 64  # before the end of epoch 1: stopped mid-loader
    assert (tmp_path / "logs" / "checkpoints" / "last.pth").exists()
