"""Data-quality gates of the weekly matrix build.

The build job measures its input (``EventStats``), this module judges it: every check yields a
``CheckResult`` (name, passed, value, threshold, detail), all of them go into the snapshot manifest, and
``enforce`` raises one ``DataError`` naming every failed check with its numbers and threshold. The job
runs the gates before it writes anything, so a failing build publishes nothing and the previous snapshot
stays the one readers see.

Checks (thresholds in ``DQConfig``):

- ``schema``: user_id/item_id present with integer or string type; weight numeric; event_ts a timestamp
  (a string or an integer epoch is refused, not guessed: its unit and zone are unknown).
- ``null_ids`` / ``negative_ids``: any null or negative id fails.
- ``zero_events``: no event in the window fails.
- ``future_events``: events after the end of the as-of day (more than ``max_future_events``) fail.
- ``out_of_window``: events in the window's partitions whose timestamp lies before the window start or
  after the as-of day (future events included), as a fraction of all events, above
  ``max_out_of_window_fraction`` fails.
- ``duplicate_ratio``: events repeating a (user, item) pair already seen in the window, as a fraction of
  all events, above ``max_duplicate_fraction`` fails.
- ``events_drop`` / ``users_drop`` / ``items_drop``: a count falling by more than ``max_drop_fraction``
  against the previous snapshot's manifest fails (skipped, and recorded as such, without a previous one).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pipeline.errors import DataError

ID_TYPES = ("int", "string")
REQUIRED = ("user_id", "item_id")
SCHEMA_FIX = ("write user_id and item_id as int64 or strings, weight as a number and event_ts as a ms or us Parquet "
              "timestamp (`recsys ingest --format interactions` converts unix seconds and nanosecond timestamps); "
              "the previous snapshot stays published")


class DQConfig(BaseModel):
    """Thresholds of the gates. Fractions are in [0, 1]."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_future_events: int = Field(0, ge=0)
    max_out_of_window_fraction: float = Field(0.001, ge=0.0, le=1.0)
    max_duplicate_fraction: float = Field(0.5, ge=0.0, le=1.0)
    max_drop_fraction: float = Field(0.5, ge=0.0, le=1.0)  # against the previous snapshot


@dataclass(frozen=True)
class CheckResult:
    name: str
    passed: bool
    value: float | int | str | None
    threshold: float | int | str | None
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EventStats:
    """What the job measured on the events of the window (and, once built, on the matrix)."""

    events: int
    null_ids: int = 0
    negative_ids: int = 0
    future_events: int = 0
    out_of_window: int = 0
    pairs: int | None = None  # distinct (user, item) pairs; None when not measured yet
    users: int | None = None  # users kept in the snapshot this week
    items: int | None = None  # items with training interactions this week


def check_schema(fields: dict[str, str]) -> CheckResult:
    """``fields``: column name -> kind (int, string, float, timestamp, or anything else: the raw type name)."""
    problems = [f"missing column {c}" for c in REQUIRED if c not in fields]
    problems += [f"{c} has type {fields[c]} (need int64 or string)"
                 for c in REQUIRED if c in fields and fields[c] not in ID_TYPES]
    if "weight" in fields and fields["weight"] not in ("int", "float"):
        problems.append(f"weight has type {fields['weight']} (need a number)")
    if "event_ts" in fields and fields["event_ts"] != "timestamp":
        problems.append(f"event_ts has type {fields['event_ts']} (need a Parquet timestamp in ms or us; strings and "
                        "integer epochs are not read as times)")
    found = ", ".join(f"{k}:{v}" for k, v in fields.items())
    return CheckResult("schema", not problems, found, "user_id,item_id int64|string; weight number; event_ts timestamp",
                       "; ".join(problems) or "ok")


def _upper(name: str, value: float, limit: float, what: str) -> CheckResult:
    return CheckResult(name, value <= limit, value, limit, f"{what}: {value} (max {limit})")


def check_events(stats: EventStats, cfg: DQConfig) -> list[CheckResult]:
    """The gates that need only the raw event counts (run before the matrix is built)."""
    n = stats.events
    out = [
        CheckResult("zero_events", n > 0, n, 1, f"{n} event(s) in the window (need at least 1)"),
        _upper("null_ids", stats.null_ids, 0, "events with a null user_id or item_id"),
        _upper("negative_ids", stats.negative_ids, 0, "events with a negative user_id or item_id"),
        _upper("future_events", stats.future_events, cfg.max_future_events, "events after the as-of day"),
    ]
    frac = stats.out_of_window / n if n else 0.0
    out.append(CheckResult("out_of_window", frac <= cfg.max_out_of_window_fraction, round(frac, 6),
                           cfg.max_out_of_window_fraction,
                           f"{stats.out_of_window} of {n} events have a timestamp outside the window "
                           f"(fraction {frac:.4g}, max {cfg.max_out_of_window_fraction})"))
    if stats.pairs is not None:
        kept = n - stats.out_of_window  # events the pairs were built from
        dup = kept - stats.pairs
        frac = dup / kept if kept else 0.0
        out.append(CheckResult("duplicate_ratio", frac <= cfg.max_duplicate_fraction, round(frac, 6),
                               cfg.max_duplicate_fraction,
                               f"{dup} of {kept} events repeat a (user, item) pair (fraction {frac:.4g}, "
                               f"max {cfg.max_duplicate_fraction})"))
    return out


def check_drops(current: dict[str, int], previous: dict[str, Any] | None, cfg: DQConfig) -> list[CheckResult]:
    """Volume gates: ``current`` and ``previous`` map events/users/items to counts (previous: a manifest's dq_counts)."""
    out = []
    for key in ("events", "users", "items"):
        name = f"{key}_drop"
        before = (previous or {}).get(key)
        now = current[key]
        if not before:
            out.append(CheckResult(name, True, now, cfg.max_drop_fraction, "no previous snapshot to compare with"))
            continue
        drop = max(0.0, (before - now) / before)
        out.append(CheckResult(name, drop <= cfg.max_drop_fraction, round(drop, 6), cfg.max_drop_fraction,
                               f"{key}: {now} now vs {before} in the previous snapshot (drop {drop:.1%}, "
                               f"max {cfg.max_drop_fraction:.1%})"))
    return out


def enforce(results: list[CheckResult], where: str) -> None:
    """Raise one DataError naming every failed check (nothing is published by the caller then)."""
    failed = [r for r in results if not r.passed]
    if failed:
        what = "; ".join(f"{r.name} failed ({r.detail})" for r in failed)
        if any(r.name == "schema" for r in failed):  # no threshold to relax: the files must change
            raise DataError(f"data-quality gate(s) failed for {where}: {what}", SCHEMA_FIX)
        raise DataError(f"data-quality gate(s) failed for {where}: {what}",
                        "fix the events (or re-ingest them), or relax the threshold in DQConfig / the --dq-* "
                        "options if the change is expected; the previous snapshot stays published")
