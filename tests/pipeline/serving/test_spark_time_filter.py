"""The Spark engine cuts histories at UTC midnight whatever the Python process's time zone, for both timestamp
types Parquet holds (tz-aware -> Spark TIMESTAMP, naive -> TIMESTAMP_NTZ), and keeps exactly the events the
local engine keeps. A naive datetime literal used to be converted in the local zone: under America/New_York
the cut-off moved to 04:00 UTC, under Asia/Kolkata to 18:30 UTC the day before."""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from infer_support import tiny_bundle

from pipeline.serving.events import events_filter, open_events
from pipeline.serving.options import InferOptions
from pipeline.serving.spark_engine import get_spark, histories
from pipeline.serving.vocab import vocabulary

DAY = dt.date(2024, 5, 3)
# (event time in UTC, kept for DAY with a 2-day window, kept with no window): each event is its own user
EVENTS = [
    (dt.datetime(2024, 5, 1, 20, 0), False, True),  # Kolkata's old start (05-01 18:30 UTC) kept it
    (dt.datetime(2024, 5, 1, 23, 30), False, True),
    (dt.datetime(2024, 5, 2, 0, 30), True, True),
    (dt.datetime(2024, 5, 2, 2, 0), True, True),  # New York's old start (05-02 04:00 UTC) dropped it
    (dt.datetime(2024, 5, 3, 20, 0), True, True),  # Kolkata's old end (05-03 18:30 UTC) dropped it
    (dt.datetime(2024, 5, 3, 23, 30), True, True),
    (dt.datetime(2024, 5, 4, 0, 30), False, False),
    (dt.datetime(2024, 5, 4, 3, 0), False, False),  # New York's old end (05-04 04:00 UTC) kept it
]


@pytest.fixture(params=["America/New_York", "Asia/Kolkata"])
def local_zone(request: pytest.FixtureRequest) -> Iterator[str]:
    """This process's local time zone (what PySpark converts naive datetimes with), restored afterwards."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = request.param
    time.tzset()
    try:
        yield str(request.param)
    finally:
        if before is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = before
        time.tzset()


@pytest.mark.parametrize("aware", [True, False], ids=["timestamp-utc", "timestamp-naive"])
@pytest.mark.parametrize("history_days", [2, None], ids=["window", "all"])
def test_spark_history_cut_is_utc_midnight_in_any_local_zone(tmp_path: Path, spark, local_zone: str, aware: bool,
                                                             history_days: int | None) -> None:
    assert time.localtime(0).tm_gmtoff != 0  # the zone really moved
    bundle = tiny_bundle()
    items = bundle.item_ids[: len(EVENTS)].tolist()
    ts_type = pa.timestamp("us", tz="UTC") if aware else pa.timestamp("us")
    stamps = [t.replace(tzinfo=dt.UTC) if aware else t for t, _, _ in EVENTS]
    path = tmp_path / "events.parquet"  # one file, no dt= partitions: event_ts alone cuts the history
    pq.write_table(pa.table({"user_id": pa.array(range(len(EVENTS)), pa.int64()), "item_id": pa.array(items, pa.int64()),
                             "event_ts": pa.array(stamps, ts_type)}), path)
    opts = InferOptions(date=DAY, events=str(path), history_days=history_days)

    kept = {(u, items[u]) for u, (_, in_window, in_all) in enumerate(EVENTS) if (in_window if history_days else in_all)}
    local = open_events(str(path)).to_table(columns=["user_id", "item_id"], filter=events_filter(open_events(str(path)), opts))
    assert set(zip(local["user_id"].to_pylist(), local["item_id"].to_pylist(), strict=True)) == kept

    session = get_spark()
    assert session is spark and session.conf.get("spark.sql.session.timeZone") == "UTC"
    joined, hist = histories(session, opts, vocabulary(bundle))
    assert {(r["user_id"], r["item_id"]) for r in joined.select("user_id", "item_id").collect()} == kept
    assert sorted(r["user_id"] for r in hist.collect()) == sorted(u for u, _ in kept)
