"""The stop agreement's interval follows the step time and is agreed: every rank checks, and
stops, at the same batch (real gloo processes through the real CLI)."""

from __future__ import annotations

import json
import signal

import pytest

from tests.distributed.conftest import ddprun, run

pytestmark = pytest.mark.timeout(180)


def _agreements(folder):
    return [
        [json.loads(line) for line in (folder / f"rank{r}.jsonl").read_text().splitlines()]
        for r in (0, 1)
    ]


def test_ranks_agree_at_the_same_batches_while_proposals_differ(tmp_path):
    result = run(ddprun(2, "stop_interval", "--out", str(tmp_path)), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = _agreements(tmp_path)
    # 2 epochs + 1 epoch of (64 + 13) train batches per rank
    assert (tmp_path / "rank0.done").read_text() == (tmp_path / "rank1.done").read_text() == "231"
    # the same stages and batches on both ranks, across loader ends, epochs and stages
    assert [a[:2] for a in rank0] == [a[:2] for a in rank1]
    batches = [a[1] for a in rank0]
    assert batches[:2] == [1, 2]  # the first agreement comes after one batch
    # rank 1 aims at twice rank 0's interval: the proposals differ, the answers do not
    proposals0, proposals1 = [a[2] for a in rank0], [a[2] for a in rank1]
    assert sum(p1 > p0 for p0, p1 in zip(proposals0, proposals1)) >= len(proposals0) // 2
    answers = [a[4] for a in rank0]
    assert answers == [a[4] for a in rank1]
    assert [a[3] for a in rank0] == [a[3] for a in rank1] == [None] * len(rank0)  # no signal
    for i, answer in enumerate(answers):
        if answer is not None:  # None: nothing in flight (first call, or first after a drain)
            assert answer == max(proposals0[i - 1], proposals1[i - 1])
    assert all(1 <= p <= 32 for p in proposals0 + proposals1)
    # 2+ ms steps with rank 0 aiming at 50 ms: rank 0 proposes short intervals, not the cap
    assert min(proposals0) < 28


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_batch(tmp_path):
    args = ("--out", str(tmp_path), "--signal-at", "10")
    result = run(ddprun(2, "stop_interval", *args), tmp_path)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
    rank0, rank1 = _agreements(tmp_path)
    stops = [[a[1] for a in rank if a[3] is not None][:1] for rank in (rank0, rank1)]
    assert stops[0] == stops[1] and stops[0], (rank0, rank1)
    stopped_at = stops[0][0]
    assert stopped_at == rank0[-1][1] == rank1[-1][1]  # nobody agreed again after it
    # within two agreed intervals (at most 32 batches each) of the signal, inside train_a
    assert 10 < stopped_at <= 10 + 2 * 32
    assert stopped_at <= 64
    assert rank0[-1][3] == int(signal.SIGTERM)
    assert (tmp_path / "checkpoints" / "last.pth").exists()
