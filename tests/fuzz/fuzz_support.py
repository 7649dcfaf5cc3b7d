"""Helpers of the property tests: example counts, the CLI run in-process, and the lake's fingerprint."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import pytest


def scaled(n: int) -> int:
    """A property's example count: `n` in CI (the whole layer stays under a minute), 20x under
    HYPOTHESIS_PROFILE=explore."""
    return n * 20 if os.environ.get("HYPOTHESIS_PROFILE") == "explore" else n


@dataclass(frozen=True)
class Outcome:
    rc: int
    out: str
    err: str


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> Outcome:
    """`recsys ARGV` in this process. An exception escaping main() (a traceback for the user) fails the test
    with that exception; argparse's own exit is returned as its code."""
    from pipeline.cli.main import main

    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse: usage + one error line, code 2
        rc = int(e.code or 0)
    captured = capsys.readouterr()
    return Outcome(rc, captured.out, captured.err)


def assert_one_error_line(o: Outcome, command: str) -> None:
    """Exit 2 with exactly one stderr line `recsys COMMAND: error: <problem>. Fix: <fix>.`"""
    lines = o.err.splitlines()
    assert o.rc == 2 and len(lines) == 1, f"rc={o.rc}, stderr:\n{o.err}"
    assert lines[0].startswith(f"recsys {command}: error: ") and ". Fix: " in lines[0], lines[0]
    assert "Traceback" not in o.err and "errors.pydantic.dev" not in o.err


def fingerprint(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (relative path → digest): what a failed run must leave unchanged."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def assert_only_date_changed(before: dict[str, str], after: dict[str, str], day: str) -> None:
    """A publish of `day` changed nothing outside `dt=day/` except by appending commits to the Delta log (whose
    existing entries stay byte-identical): other dates untouched."""
    prefix, log = f"recommendations/dt={day}/", "recommendations/_delta_log/"
    assert {k: v for k, v in after.items() if not k.startswith((prefix, log))} == \
        {k: v for k, v in before.items() if not k.startswith((prefix, log))}, "another date changed"
    old_log = {k: v for k, v in before.items() if k.startswith(log)}
    assert {k: after.get(k) for k in old_log} == old_log, "a Delta log entry was rewritten"
    assert len([k for k in after if k.startswith(log)]) > len(old_log), "a publish without a commit"


def assert_valid_partition(lake: Path | str, day: str, top_n: int) -> list:
    """The committed recommendations of `day` read back whole: one row per user, each list non-empty, at most
    top_n distinct items, finite scores in descending order. Returns the table."""
    import math

    from pipeline.serving.recs import read_recommendations

    table = read_recommendations(str(lake), day)
    users = table["user_id"].to_pylist()
    assert table.num_rows > 0 and len(set(users)) == len(users)
    for items, scores in zip(table["item_ids"].to_pylist(), table["scores"].to_pylist(), strict=True):
        assert 0 < len(items) <= top_n and len(set(items)) == len(items) and len(scores) == len(items)
        assert all(not math.isnan(s) for s in scores) and scores == sorted(scores, reverse=True)
    return users
