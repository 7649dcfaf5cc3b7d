"""The local engine's view of the events: open the Parquet (a dt= partitioned folder or one file, local or
s3://) and build the Arrow filter that keeps the events the histories are made of: known users and items, up
to and including the date, inside the history window (by dt partition and/or event_ts, in UTC days), and
above the weight threshold. The Spark engine applies the same rules in Spark SQL (pipeline.serving.spark_engine).
"""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from pipeline.errors import DataError
from pipeline.io import lake
from pipeline.serving.options import InferOptions


def open_events(uri: str) -> ds.Dataset:
    """The events at `uri` as an Arrow dataset (dt= folders as string partitions), after checking that they
    exist and have integer or string user_id and item_id columns (DataError otherwise)."""
    loc = lake.resolve(uri)
    if not loc.exists():
        raise DataError(f"no events at {loc.uri}", "pass --events pointing at a Parquet file or a dt= partitioned folder")
    # dt= folders are partitions (kept as strings: ISO dates compare correctly as text); a single file has none
    part = None if loc.is_file() else ds.partitioning(pa.schema([("dt", pa.string())]), flavor="hive")
    try:
        dataset = ds.dataset(loc.path, filesystem=loc.fs, format="parquet", partitioning=part)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"cannot read events at {loc.uri}: {e}", "pass Parquet events (user_id, item_id, ...)") from e
    missing = {"user_id", "item_id"} - set(dataset.schema.names)
    if missing:
        raise DataError(f"events at {loc.uri} lack column(s) {sorted(missing)}", "events need user_id and item_id")
    for name in ("user_id", "item_id"):
        t = dataset.schema.field(name).type
        if not (pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)):
            raise DataError(f"events column {name} has type {t}", "use int64 or string ids")
    return dataset


def events_filter(dataset: ds.Dataset, opts: InferOptions) -> ds.Expression:
    """Events up to and including opts.date, inside the history window (dt partitions and/or event_ts).

    A tz-aware event_ts is cut at UTC midnight; a naive one is taken as UTC wall-clock time (cut at 00:00 of
    its own values), so neither depends on the time zone of the machine."""
    names = dataset.schema.names
    first = opts.first_day
    expr = pc.is_valid(ds.field("user_id")) & pc.is_valid(ds.field("item_id"))
    if "dt" in names:
        dt_type = dataset.schema.field("dt").type  # string for dt= folders; a single file may hold dates
        if not (pa.types.is_string(dt_type) or pa.types.is_large_string(dt_type) or pa.types.is_date(dt_type)):
            raise DataError(f"events column dt has type {dt_type}", "store dt as YYYY-MM-DD strings or as dates")

        def day_value(day: dt.date) -> pa.Scalar:
            return pa.scalar(day if pa.types.is_date(dt_type) else day.isoformat(), type=dt_type)

        expr &= ds.field("dt") <= day_value(opts.date)
        if first is not None:
            expr &= ds.field("dt") >= day_value(first)
    if "event_ts" in names and pa.types.is_timestamp(dataset.schema.field("event_ts").type):
        t = dataset.schema.field("event_ts").type
        tz = dt.UTC if t.tz else None

        def at(day: dt.date) -> pa.Scalar:
            return pa.scalar(dt.datetime(day.year, day.month, day.day, tzinfo=tz), type=t)

        expr &= ds.field("event_ts") < at(opts.date + dt.timedelta(days=1))
        if first is not None:
            expr &= ds.field("event_ts") >= at(first)
    if opts.min_weight is not None:  # silently keeping every event would publish unfiltered recommendations
        w = dataset.schema.field("weight").type if "weight" in names else None
        if w is None or not (pa.types.is_integer(w) or pa.types.is_floating(w)):
            raise DataError(f"--min-weight needs a numeric weight column; the events have "
                            f"{'none' if w is None else f'one of type {w}'}",
                            "drop --min-weight, or pass events with a numeric weight column")
        expr &= ds.field("weight") >= opts.min_weight
    return expr
