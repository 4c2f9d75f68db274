"""Asynchronous saves under real 2-rank DDP (gloo, the ddprun launcher): no rank waits at the
save, and a load on any rank reads the complete file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.distributed.conftest import ddprun, run

SCRIPTS = Path(__file__).parent / "scripts"


@pytest.mark.timeout(180)
def test_async_save_then_load_reads_the_complete_file_on_every_rank(tmp_path):
    delay = 1.0
    argv = ddprun(2, "async_ddp", "--out", str(tmp_path), "--delay", str(delay), folder=SCRIPTS)
    result = run(argv, tmp_path, timeout=150)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for report in reports:
        assert report["loaded_step"] == 3 and report["loaded_w_ok"], report
        assert report["problems"] == [], report
        # the first save returns at once; the next ones waited for the previous write
        assert report["blocked"][0] < delay / 2, report
        assert max(report["blocked"][1:]) > delay / 2, report
