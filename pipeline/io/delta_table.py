"""A Delta Lake table partitioned by date (`dt`), written with delta-rs (`deltalake`), one date replaced per commit.

    <root>/_delta_log/00000000000000000042.json      the commits: which files are live, the schema, who wrote them
    <root>/dt=YYYY-MM-DD/run-<id>/part-00000.parquet  data files (no dt column: Delta keeps it in the log)
    <root>/dt=YYYY-MM-DD/run-<id>/_manifest.json      the run's checksums and user ranges (ignored by Delta readers)

Writers stage a run's files in its own folder, then `commit_date` makes them the date's files in ONE commit: it
removes the files the date had and adds the run's (mode "overwrite" with a `dt = D` partition filter), with the
run's facts in the commit's custom metadata under `FACTS` (`commit_facts` reads them back). Any Delta reader
(Spark, Trino, DuckDB, Polars, delta-rs) sees the previous files or the new ones, never both, never a staged run.

Concurrency: a commit is an object put that fails when the version exists (local disk: a rename that does not
replace; S3: a conditional PUT, `If-None-Match: *`, delta-rs's default since 0.23 and the only S3 mode of 1.x,
asked for explicitly here as `conditional_put=etag`), followed by delta-rs's conflict check against the commits
that won. Two writers of the same date both remove the date's old files, so the later one fails ("a concurrent
transaction deleted data this operation read"); for a date that had no files yet, nothing is removed and delta-rs
would let both adds through, so each commit also carries an application transaction `recsys:dt=D` (a `txn`
action), and a commit that finds a concurrent commit with the same id fails. The loser gets a DataError; the
table is untouched. `AWS_S3_ALLOW_UNSAFE_RENAME` (a plain overwrite, where a racing commit is silently lost) is
refused. Writers of different dates do not conflict.

Replaced files stay where they are (a Delta remove is only a log entry): time travel and `restore` use them until
a vacuum deletes those older than its retention (pipeline.serving.restore).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from pipeline.errors import DataError
from pipeline.io.lake import Location, s3_setting

if TYPE_CHECKING:
    from deltalake import DeltaTable

PARTITION = "dt"  # the partition column: a Delta `date`, so every reader gets a date type back
DELTA_LOG = "_delta_log"
FACTS = "recsys"  # the commit-info key holding this project's facts about a commit (a JSON object)
UNSAFE = "AWS_S3_ALLOW_UNSAFE_RENAME"


class CommitRefused(DataError):
    """The commit was refused (a concurrent commit of the date won, or another schema): nothing was committed."""


def app_id(date: dt.date) -> str:
    """The application-transaction id of a date's commits (see the module doc)."""
    return f"recsys:{PARTITION}={date.isoformat()}"


def storage_options(root: Location) -> dict[str, str] | None:
    """delta-rs's object-store options for `root`: none on a local disk; on S3 the endpoint and timeouts from the
    same environment pipeline.io.lake uses (credentials stay in the environment, read by delta-rs itself), and the
    conditional-put commit mode. A DataError when the environment asks for unsafe renames."""
    if isinstance(root.fs, pafs.LocalFileSystem):
        return None
    if os.environ.get(UNSAFE, "").strip().lower() in ("1", "true", "yes"):
        raise DataError(f"{UNSAFE} is set: concurrent Delta commits on S3 could then overwrite each other",
                        f"unset {UNSAFE}; commits use S3 conditional writes (If-None-Match), which AWS S3 supports")
    opts = {"conditional_put": "etag",
            "timeout": f"{max(1, int(s3_setting('RECSYS_S3_REQUEST_TIMEOUT')))}s",
            "connect_timeout": f"{max(1, int(s3_setting('RECSYS_S3_CONNECT_TIMEOUT')))}s"}
    endpoint = os.environ.get("RECSYS_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint_url"] = endpoint
        if urlparse(endpoint).scheme == "http":
            opts["allow_http"] = "true"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        opts["region"] = region
    return opts


def table_uri(root: Location) -> str:
    return root.path if isinstance(root.fs, pafs.LocalFileSystem) else root.uri


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def open_table(root: Location, version: int | None = None) -> DeltaTable | None:
    """The table at `root` (its latest version, or `version`), or None when there is no Delta table there."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        table = DeltaTable(table_uri(root), storage_options=storage_options(root))
    except TableNotFoundError:
        return None
    except (OSError, Exception) as e:  # delta-rs raises its own DeltaError (an Exception) for store failures
        if isinstance(e, DataError):
            raise
        _explain_store_failure(root)
        raise DataError(f"cannot read the Delta table at {root.uri}: {_first_line(e)}",
                        "check access to the lake (and AWS_ENDPOINT_URL), then retry") from e
    if version is not None:
        load_version(table, root, version)
    return table


def _explain_store_failure(root: Location) -> None:
    """After delta-rs failed to open `root`: raise the lake's own one-line error where it has one (a file where
    the table's folder should be; an unreachable S3 endpoint, which the lake also remembers to fail fast).
    Only on the failure path, so a healthy read pays no extra request."""
    if isinstance(root.fs, pafs.LocalFileSystem):
        if os.path.isfile(root.path):
            raise DataError(f"path {root.path} has a file where a folder is expected",
                            "pass the lake's root folder (the job's --out), not a file")
        return
    root.join("_delta_log").exists()  # raises the lake's DataError for an unreachable endpoint


def load_version(table: DeltaTable, root: Location, version: int) -> None:
    """Time-travel `table` to `version`: a DataError naming the versions there are when it does not exist."""
    latest = table.version()
    if not 0 <= version <= latest:
        raise DataError(f"the Delta table at {root.uri} has no version {version} (versions 0..{latest})",
                        "pick a version from `recsys history`")
    try:
        table.load_as_version(version)
    except Exception as e:
        raise DataError(f"version {version} of the Delta table at {root.uri} cannot be loaded: {_first_line(e)} "
                        "(its log may have been cleaned up)", "pick a newer version from `recsys history`") from e


def delta_schema_json(schema: pa.Schema) -> dict[str, Any]:
    from deltalake import Schema

    parsed: dict[str, Any] = json.loads(Schema.from_arrow(schema).to_json())
    return parsed


def table_schema(files_schema: pa.Schema) -> pa.Schema:
    """The table's schema for data files of `files_schema`: theirs plus the date partition column."""
    if PARTITION in files_schema.names:
        raise ValueError(f"data files must not hold the partition column {PARTITION!r}: Delta keeps it in the log")
    return files_schema.append(pa.field(PARTITION, pa.date32()))


def check_schema(table: DeltaTable, root: Location, files_schema: pa.Schema) -> None:
    """A DataError when the existing table at `root` has another schema or partitioning than a run's files would
    give it (a table written by another job or an older format): nothing may be committed into it."""
    want = delta_schema_json(table_schema(files_schema))
    have = json.loads(table.schema().to_json())
    parts = table.metadata().partition_columns
    if have != want or parts != [PARTITION]:
        def cols(s: dict[str, Any]) -> str:
            return ", ".join(f"{f['name']}: {json.dumps(f['type'])}" for f in s.get("fields", []))
        raise CommitRefused(f"the Delta table at {root.uri} has another schema (columns {cols(have)}; partitioned by "
                        f"{parts}) than this run's files (columns {cols(want)}; partitioned by ['{PARTITION}'])",
                        "publish to another --out, or move that table away (it was written by another job or format)")


@dataclass(frozen=True)
class DataFile:
    """A staged data file to commit: its path under the table root, size, rows and (when known) user range."""

    path: str
    size: int
    rows: int
    key_min: Any = None
    key_max: Any = None


def _stats(f: DataFile, key: str) -> str:
    stats: dict[str, Any] = {"numRecords": f.rows}
    if f.key_min is not None and f.key_max is not None:  # lets Delta readers skip files on user_id
        stats |= {"minValues": {key: f.key_min}, "maxValues": {key: f.key_max}, "nullCount": {key: 0}}
    return json.dumps(stats)


def _conflict(root: Location, date: dt.date, e: BaseException) -> CommitRefused:
    return CommitRefused(f"the commit of {date} to the Delta table at {root.uri} lost to a concurrent commit of the same "
                     f"date ({_first_line(e)}); that commit stands, this run's files were not published",
                     "let one run per date finish; re-run the date if the other run was not the one you wanted")


def commit_date(root: Location, date: dt.date, files: Iterable[DataFile], files_schema: pa.Schema,
                facts: dict[str, Any], key: str = "user_id", table: DeltaTable | None = None) -> int:
    """Make `files` the files of `date` in one commit (the date's previous files removed), with `facts` in the
    commit's metadata; returns the version it committed. `table`: the snapshot the commit is based on (default:
    the latest). CommitRefused (nothing committed) when the table has another schema or a concurrent commit of the
    date won; a plain DataError when the store failed (the outcome is then unknown: `history` tells)."""
    from deltalake import CommitProperties, Schema, Transaction
    from deltalake.exceptions import CommitFailedError
    from deltalake.transaction import AddAction, RemoveAction, create_table_with_add_actions

    schema = table_schema(files_schema)
    now = int(time.time() * 1000)
    adds = [AddAction(f.path, f.size, {PARTITION: date.isoformat()}, now, True, _stats(f, key)) for f in files]
    body = json.loads(json.dumps({**facts, PARTITION: date.isoformat()}, default=str))  # JSON values only
    opts = storage_options(root)
    if table is None:
        table = open_table(root)
    if table is None:  # the first commit creates the table: one version, as any other date commit
        props = CommitProperties(custom_metadata={FACTS: body}, app_transactions=[Transaction(app_id(date), 1)])
        try:
            create_table_with_add_actions(table_uri(root), Schema.from_arrow(schema), adds, mode="error",
                                          partition_by=[PARTITION], storage_options=opts, commit_properties=props)
        except Exception as e:
            if "already exists" in str(e):  # another writer created it meanwhile: that commit stands
                raise _conflict(root, date, e) from e
            raise DataError(f"cannot create the Delta table at {root.uri}: {_first_line(e)}",
                            "check access to the lake, then re-run the date") from e
        return 0
    check_schema(table, root, files_schema)
    read_version = table.version()
    props = CommitProperties(custom_metadata={FACTS: body},
                             app_transactions=[Transaction(app_id(date), (table.transaction_version(app_id(date)) or 0) + 1)])
    try:
        actions: list[AddAction | RemoveAction] = list(adds)
        table.create_write_transaction(actions, mode="overwrite", schema=schema, partition_by=[PARTITION],
                                       partition_filters=[(PARTITION, "=", date.isoformat())], commit_properties=props)
    except CommitFailedError as e:
        raise _conflict(root, date, e) from e
    except Exception as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"cannot commit {date} to the Delta table at {root.uri}: {_first_line(e)}",
                        "check access to the lake, then re-run the date") from e
    return max(table.version(), read_version + 1)  # the handle advances to the version it committed


def live_files(table: DeltaTable, date: dt.date | None = None) -> pa.Table:
    """The files of the table's loaded version (of `date` only, when given): columns path, size, rows, date."""
    raw = pa.table(table.get_add_actions(flatten=True))
    col = f"partition.{PARTITION}"
    if raw.num_rows == 0 or col not in raw.column_names:
        return pa.table({"path": pa.array([], pa.string()), "size": pa.array([], pa.int64()),
                         "rows": pa.array([], pa.int64()), "date": pa.array([], pa.date32())})
    out = pa.table({"path": raw["path"], "size": raw["size_bytes"], "rows": raw["num_records"],
                    "date": raw[col].cast(pa.date32())})
    if date is not None:
        out = out.filter(pc.equal(out["date"], pa.scalar(date, pa.date32())))
    return out


def commit_facts(commit: dict[str, Any]) -> dict[str, Any] | None:
    """This project's facts of one `DeltaTable.history()` entry (None for another writer's commit)."""
    facts = commit.get(FACTS)
    if isinstance(facts, str):
        try:
            facts = json.loads(facts)
        except ValueError:
            return None
    return facts if isinstance(facts, dict) else None


def live_files_of(files: pa.Table, date: dt.date) -> list[tuple[str, int]]:
    """(path, size) of `date`'s rows in a `live_files` table, by path."""
    day = files.filter(pc.equal(files["date"], pa.scalar(date, pa.date32())))
    return sorted(zip(day["path"].to_pylist(), day["size"].to_pylist(), strict=True))


def drop_dates_before(root: Location, before: dt.date, facts: dict[str, Any]) -> tuple[int | None, list[dt.date]]:
    """Remove every date older than `before` from the table in one commit (its files stay for a vacuum, so a dropped
    date can be restored within the retention): the table's own retention, where an object-store expiry rule
    would delete the log. Returns (the version committed, the dates dropped); (None, []) when there was none."""
    from deltalake import CommitProperties
    from deltalake.exceptions import CommitFailedError
    from deltalake.transaction import AddAction, RemoveAction

    table = open_table(root)
    if table is None:
        return None, []
    files = live_files(table)
    old = files.filter(pc.less(files["date"], pa.scalar(before, pa.date32())))
    if old.num_rows == 0:
        return None, []
    dates = sorted(set(old["date"].to_pylist()))
    now = int(time.time() * 1000)
    actions: list[AddAction | RemoveAction] = [
        RemoveAction(p, True, now, s, {PARTITION: d.isoformat()})
        for p, s, d in zip(old["path"].to_pylist(), old["size"].to_pylist(), old["date"].to_pylist(), strict=True)]
    body = json.loads(json.dumps({**facts, "operation": "drop", "dates": [d.isoformat() for d in dates]}, default=str))
    try:
        table.create_write_transaction(actions, mode="append", schema=pa.schema(table.schema().to_arrow()),
                                       partition_by=[PARTITION],
                                       commit_properties=CommitProperties(custom_metadata={FACTS: body}))
    except CommitFailedError as e:
        raise CommitRefused(f"dropping the dates before {before} from the Delta table at {root.uri} lost to a concurrent "
                            f"commit ({_first_line(e)}); nothing was dropped", "run it again") from e
    return max(table.version(), 0), dates
