"""Dates from outside: any text, any calendar date (the calendar's ends included), into the one parser and into
the commands that compute a window from a date. A date or one DataError; never another exception."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from fuzz_support import assert_one_error_line, run_cli, scaled
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pipeline.errors import DataError
from pipeline.io.dates import parse_date

DATE_LIKE = st.from_regex(r"\A[0-9]{4}-[0-9]{2}-[0-9]{2}\Z")


@settings(max_examples=scaled(150))
@given(st.one_of(st.text(max_size=14), DATE_LIKE, st.dates().map(dt.date.isoformat)))
@example("2024-02-30")
@example("0000-01-01")
@example("９９９９-１２-３１")
@example("2024-05-01\n")
@example("")
def test_parse_date_gives_a_date_or_one_data_error(text: str) -> None:
    try:
        day = parse_date(text)
    except DataError as e:
        assert "\n" not in str(e) and ". Fix: " in str(e)
        return
    assert isinstance(day, dt.date) and day.isoformat() == text


@settings(max_examples=scaled(100))
@given(st.one_of(st.dates(), st.datetimes()))
def test_parse_date_passes_dates_through(value: dt.date) -> None:
    assert parse_date(value) == (value.date() if isinstance(value, dt.datetime) else value)
    assert parse_date(parse_date(value).isoformat()) == parse_date(value)


@pytest.fixture(scope="module")
def empty_events(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An events folder with one dt= folder and no files: build-matrix lists its inputs, finds none, and stops
    before Spark starts."""
    root = tmp_path_factory.mktemp("events")
    (root / "dt=2024-01-01").mkdir()
    return root


@settings(max_examples=scaled(25))
@given(as_of=st.dates(), window=st.integers(min_value=-2, max_value=4_000_000))
@example(as_of=dt.date.min, window=2)
@example(as_of=dt.date.max, window=1)
@example(as_of=dt.date(2024, 1, 1), window=10**6)
def test_build_matrix_window_at_the_calendar_ends(empty_events: Path, tmp_path: Path, as_of: dt.date, window: int,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "lake"
    o = run_cli(["build-matrix", "--events", str(empty_events), f"--as-of={as_of.isoformat()}",
                 f"--window-days={window}", "--out", str(out)], capsys)
    assert_one_error_line(o, "build-matrix")  # no events in any window: always refused, in one line
    assert not out.exists() or not any(out.rglob("*.parquet"))
