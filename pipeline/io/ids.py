"""User and item ids from outside (event files, the CLI, a service): one rule, applied at ingestion and at read
time alike, so every id the pipeline accepts and publishes can be looked up again.

An id is a 64-bit signed integer, or a string of 1-256 characters with no control characters (C0/C1, DEL) and
no lone surrogates. Anything else printable is allowed (unicode letters, '/', spaces inside): ids are data, never
path parts or query text, so they need no stricter alphabet.
"""

from __future__ import annotations

import unicodedata
from typing import Any

from pipeline.errors import DataError

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_STRING_ID = 256


def string_id_problem(value: str) -> str | None:
    """Why `value` is not a valid string id, or None when it is."""
    if not value:
        return "it is empty"
    if len(value) > MAX_STRING_ID:
        return f"it is {len(value)} characters long (at most {MAX_STRING_ID})"
    for ch in value:
        cat = unicodedata.category(ch)
        if cat == "Cc":
            return f"it holds the control character U+{ord(ch):04X}"
        if cat == "Cs":
            return f"it holds the lone surrogate U+{ord(ch):04X}"
    return None


def check_id(value: Any, what: str = "user id") -> int | str:
    """An id from outside, checked and kept as given (an int stays an int, a string a string)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise DataError(f"invalid {what} {str(value)[:40]!r}", f"pass an integer or a string {what}")
    if isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            raise DataError(f"{what} {str(value)[:40]} is outside the int64 range",
                            f"pass the {what} as stored in the events (a 64-bit signed integer)")
        return value
    problem = string_id_problem(value)
    if problem:
        raise DataError(f"invalid {what} {value[:40]!r}: {problem}",
                        f"use 1-{MAX_STRING_ID} characters without control characters")
    return value
