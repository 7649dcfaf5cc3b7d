"""bench.score_stages: every stage of a (tiny) scoring batch is timed and printed, with the machine line."""

from __future__ import annotations

import re

import pytest

from bench import score_stages


def test_prints_every_stage_with_a_time(capsys: pytest.CaptureFixture[str]) -> None:
    score_stages.main(["--users", "40", "--items", "300", "--mean-items", "5", "--k", "10", "--margin", "5",
                       "--repeats", "1", "--tiles", "16"])
    out = capsys.readouterr().out
    assert out.startswith("one batch of 40 users x 300 items") and "top-10" in out and "CPUs" in out
    times = dict(re.findall(r"^(\S.*?)\s+([0-9.]+) ms$", out, re.M))
    for stage in ("hidden layers (fp32)", "fp32 product", "fp32 top-k", "bf16 product", "bf16 candidates (top 15)",
                  "fp32 re-score of the candidates", "final order", "bf16 product + candidates, tiles of 16",
                  "recommend_bf16, whole batch"):
        assert float(times[stage]) > 0, stage
