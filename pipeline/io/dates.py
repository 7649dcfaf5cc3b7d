"""Dates from outside (command lines, Airflow run dates, partition names): one parser, one message.

Jobs take `datetime.date` fields; everything that turns text into such a date goes through `parse_date`.
"""

from __future__ import annotations

import datetime as dt
import re

from pipeline.errors import DataError

_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def parse_date(value: str | dt.date) -> dt.date:
    """YYYY-MM-DD and a real calendar date (a date or datetime passes through as its date), else a DataError."""
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    if not isinstance(value, str) or not _DATE.fullmatch(value):
        raise DataError(f"invalid date {str(value)[:40]!r}", "use YYYY-MM-DD, e.g. 2024-05-01")
    try:
        return dt.date.fromisoformat(value)
    except ValueError as e:
        raise DataError(f"{value!r} is not a calendar date ({e})", "use a real date in YYYY-MM-DD") from e
