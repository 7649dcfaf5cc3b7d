"""Reading published recommendations (for downstream services): only committed partitions (`_SUCCESS`).

    read_recommendations("s3://lake", "2024-05-01")            one date's table
    read_recommendations("/lake", "latest", user_ids=[42, 7])  the newest committed date, a few users
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import lake
from pipeline.errors import DataError
from pipeline.publish import SUCCESS, committed_run

_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_USER = re.compile(r"^[A-Za-z0-9_.:@\-]{1,128}$")
MAX_USERS = 100_000


def parse_date(text: str | dt.date) -> dt.date:
    """YYYY-MM-DD and a real calendar date, else a DataError naming the problem."""
    if isinstance(text, dt.datetime):
        return text.date()
    if isinstance(text, dt.date):
        return text
    if not isinstance(text, str) or not _DATE.match(text):
        raise DataError(f"invalid date {str(text)[:40]!r}", "use YYYY-MM-DD, e.g. 2024-05-01")
    try:
        return dt.date.fromisoformat(text)
    except ValueError as e:
        raise DataError(f"{text!r} is not a calendar date ({e})", "use a real date in YYYY-MM-DD") from e


def parse_user_id(text: Any) -> int | str:
    """A user id from outside (CLI, a service): an int, or a short string of safe characters."""
    if isinstance(text, bool):
        raise DataError(f"invalid user id {text!r}", "pass an integer or a string id")
    if isinstance(text, int):
        return text
    if not isinstance(text, str) or not _USER.match(text):
        raise DataError(f"invalid user id {str(text)[:40]!r}",
                        "pass an integer or a 1-128 character id of letters, digits, _ . : @ -")
    return int(text) if re.fullmatch(r"-?\d{1,18}", text) else text


def recommendations_root(out_uri: str) -> lake.Location:
    return lake.resolve(out_uri).join("recommendations")


def committed_dates(out_uri: str) -> list[dt.date]:
    """Dates with a committed partition, newest first."""
    root = recommendations_root(out_uri)
    dates = []
    for name in root.list():
        if name.startswith("dt=") and _DATE.match(name[3:]):
            try:
                day = dt.date.fromisoformat(name[3:])
            except ValueError:
                continue
            if root.join(name, SUCCESS).is_file():
                dates.append(day)
    return sorted(dates, reverse=True)


def resolve_date(out_uri: str, date: str | dt.date) -> dt.date:
    if date == "latest":
        dates = committed_dates(out_uri)
        if not dates:
            raise DataError(f"no committed recommendations under {recommendations_root(out_uri).uri}",
                            "run `recsys infer` first, or check --out")
        return dates[0]
    return parse_date(date)


def _user_filter(table_type: pa.DataType, user_ids: Iterable[Any]) -> pa.Array:
    ids = [parse_user_id(u) for u in user_ids]
    if len(ids) > MAX_USERS:
        raise DataError(f"{len(ids)} user ids asked for", f"ask for at most {MAX_USERS} at a time, or read the whole date")
    if pa.types.is_integer(table_type):
        if not all(isinstance(u, int) for u in ids):
            raise DataError("string user ids asked for, but this partition has integer user ids", "pass integer ids")
        return pa.array(ids, pa.int64())
    return pa.array([str(u) for u in ids], pa.string())


def read_recommendations(out_uri: str, date: str | dt.date = "latest", user_ids: Iterable[Any] | None = None,
                         columns: list[str] | None = None) -> pa.Table:
    """The committed recommendations of `date` ('latest': newest committed date), optionally a few users.

    Raises DataError when the date has no committed partition (absent, or a run that never finished)."""
    day = resolve_date(out_uri, date)
    partition = recommendations_root(out_uri).join(f"dt={day.isoformat()}")
    for attempt in range(3):  # a re-run may delete the folder we were pointed at: re-read the pointer
        found = committed_run(partition)
        if found is None:
            raise DataError(f"no committed recommendations for {day} under {partition.uri}",
                            "run `recsys infer --date` for that date, or use --date latest")
        run, manifest = found
        try:
            tables = [pq.read_table(run.join(f["path"]).path, filesystem=run.fs, columns=columns) for f in manifest["files"]]
        except (OSError, FileNotFoundError, pa.ArrowInvalid):
            if attempt == 2:
                raise
            continue
        break
    table = pa.concat_tables(tables) if tables else _empty(manifest)
    if user_ids is not None:
        wanted = _user_filter(table.schema.field("user_id").type, user_ids)
        table = table.filter(pc.is_in(table.column("user_id"), value_set=wanted))
    return table.replace_schema_metadata({"dt": day.isoformat(), "model_version": str(manifest.get("model_version", ""))})


def _empty(manifest: dict[str, Any]) -> pa.Table:
    return pa.table({"user_id": pa.array([], pa.int64()), "item_ids": pa.array([], pa.list_(pa.int64())),
                     "scores": pa.array([], pa.list_(pa.float32())), "model_version": pa.array([], pa.string()),
                     "fallback": pa.array([], pa.bool_())})


def user_recommendations(out_uri: str, date: str | dt.date, user_id: Any) -> dict[str, Any]:
    """One user's list: {'date', 'user_id', 'model_version', 'fallback', 'items': [(item, score), ...]}."""
    uid = parse_user_id(user_id)
    table = read_recommendations(out_uri, date, [uid])
    meta = table.schema.metadata or {}
    day = meta.get(b"dt", b"").decode()
    if table.num_rows == 0:
        raise DataError(f"user {uid!r} has no recommendations for {day}", "check the user id (inactive users get none)")
    row = table.slice(0, 1).to_pylist()[0]
    return {"date": day, "user_id": row["user_id"], "model_version": row["model_version"], "fallback": row["fallback"],
            "items": list(zip(row["item_ids"], row["scores"], strict=True))}
