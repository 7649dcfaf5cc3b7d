"""pipeline.io.dates.parse_date: the one parser of dates from outside."""

from __future__ import annotations

import datetime as dt

import pytest

from pipeline.errors import DataError
from pipeline.io.dates import parse_date


def test_iso_dates_and_date_objects() -> None:
    assert parse_date("2026-01-17") == dt.date(2026, 1, 17)
    assert parse_date(dt.date(2026, 1, 17)) == dt.date(2026, 1, 17)
    assert parse_date(dt.datetime(2026, 1, 17, 23, 59, tzinfo=dt.UTC)) == dt.date(2026, 1, 17)


@pytest.mark.parametrize("bad", ["2026-02-30", "yesterday", "2026-1-1", "2026-01-01\n", "2026-01-01; rm -rf /", "", None,
                                 20260101])
def test_anything_else_is_one_clear_error(bad: object) -> None:
    with pytest.raises(DataError, match=r"date.*Fix: use"):
        parse_date(bad)  # type: ignore[arg-type]
