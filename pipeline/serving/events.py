"""The local engine's view of the events: open the Parquet (a dt= partitioned folder or one file, local or
s3://) and build the Arrow filter that keeps the events the histories are made of: known users and items, up
to and including the date, inside the history window (by dt partition and/or event_ts, in UTC days), and
above the weight threshold. The Spark engine applies the same rules in Spark SQL (pipeline.serving.spark_engine)
after the same checks of the files (`open_events`).

event_ts, when present, must be a Parquet timestamp in every file (the events contract; build-matrix's schema
gate asks the same): a string or an integer epoch (seconds? milliseconds?) cannot be cut at a day without a
guess, and skipping the cut would put events after the date into its histories, so such files are refused.
"""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from pipeline.errors import DataError
from pipeline.io import lake
from pipeline.io.ids import MAX_STRING_ID, string_id_problem
from pipeline.serving.options import InferOptions

EPOCH = dt.date(1970, 1, 1)
_PER_SECOND = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
CONTROL_CHARS = r"[\x{00}-\x{1F}\x{7F}-\x{9F}]"  # Unicode category Cc, which pipeline.io.ids refuses (RE2)


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
    if "event_ts" in dataset.schema.names:
        check_event_ts(dataset, loc.uri)
    return dataset


def check_event_ts(dataset: ds.Dataset, uri: str) -> None:
    """Every file's event_ts is a timestamp (DataError otherwise). Each file's own footer is read: a dataset takes
    its schema from one file and casts the others to it, and an int64 epoch cast to a timestamp lands in 1970,
    before every cut-off."""
    for frag in dataset.get_fragments():
        schema = frag.physical_schema
        t = schema.field("event_ts").type if "event_ts" in schema.names else None
        if t is not None and not pa.types.is_timestamp(t):
            where = uri if len(dataset.files) == 1 else f"{uri} (file {frag.path})"
            raise DataError(f"events column event_ts has type {t} in {where}, not a timestamp: the events after "
                            f"--date could not be told apart",
                            "store event_ts as a Parquet timestamp (UTC), as `recsys ingest` writes it from unix "
                            "seconds, or drop the column and partition the events by dt=")


def ts_cut(t: pa.DataType, first: dt.date | None, day_after: dt.date | None) -> ds.Expression:
    """first 00:00 UTC <= event_ts < day_after 00:00 UTC (None: no bound) for an event_ts of timestamp type `t`.

    Timestamp values count from the epoch in UTC (a naive one as if its wall clock were UTC), so one integer per
    bound serves both kinds, whatever the machine's time zone, and nothing overflows at the calendar's ends. A
    bound beyond what `t` can hold (timestamp[ns] spans 1677-2262) holds for every value, or for none."""
    event_ts, cut = ds.field("event_ts"), ds.scalar(True)
    for day, is_end in ((day_after, True), (first, False)):
        if day is None:
            continue
        value = (day - EPOCH).days * 86_400 * _PER_SECOND[t.unit]
        if INT64_MIN <= value <= INT64_MAX:
            bound = pa.scalar(value, type=t)
            cut &= (event_ts < bound) if is_end else (event_ts >= bound)
        elif (value < INT64_MIN) == is_end:  # an end before every value, or a start after every value
            cut &= ds.scalar(False)
    return cut


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
    if "event_ts" in names:
        t = dataset.schema.field("event_ts").type
        if not pa.types.is_timestamp(t):
            raise DataError(f"events column event_ts has type {t}, not a timestamp",
                            "store event_ts as a Parquet timestamp (UTC), or drop it and partition by dt=")
        expr &= ts_cut(t, first, opts.day_after)
    if opts.min_weight is not None:  # silently keeping every event would publish unfiltered recommendations
        w = dataset.schema.field("weight").type if "weight" in names else None
        if w is None or not (pa.types.is_integer(w) or pa.types.is_floating(w)):
            raise DataError(f"--min-weight needs a numeric weight column; the events have "
                            f"{'none' if w is None else f'one of type {w}'}",
                            "drop --min-weight, or pass events with a numeric weight column")
        expr &= ds.field("weight") >= opts.min_weight
    return expr


def check_user_ids(users: pa.Array, uri: str) -> None:
    """String user ids follow pipeline.io.ids' rule (1-256 characters, no control characters), so that every
    published user can be looked up again (DataError naming the first offender otherwise)."""
    if not (pa.types.is_string(users.type) or pa.types.is_large_string(users.type)):
        return
    n = pc.utf8_length(users)
    bad = pc.or_(pc.or_(pc.equal(n, 0), pc.greater(n, MAX_STRING_ID)), pc.match_substring_regex(users, CONTROL_CHARS))
    if pc.any(bad).as_py():
        raise bad_user_id(users.filter(bad)[0].as_py(), uri)


def bad_user_id(value: str, uri: str) -> DataError:
    """The one error for an events user id that breaks the id rule (both engines)."""
    why = string_id_problem(value) or "it breaks the id rule"
    return DataError(f"events at {uri} hold the user id {value[:40]!r}, which could not be looked up once published: "
                     f"{why}", f"fix or drop those events: user ids are 64-bit integers or 1-{MAX_STRING_ID} "
                               "characters without control characters")
