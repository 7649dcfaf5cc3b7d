"""Reading published recommendations (for downstream services): the live files of the Delta table
`<out>/recommendations` (pipeline.serving.layout), never a staged or replaced run.

    read_recommendations("s3://lake", "2024-05-01")            one date's table
    read_recommendations("/lake", "latest", user_ids=[42, 7])  the newest committed date, a few users
    for batch in iter_recommendations("s3://lake", "latest"):   a whole date, streamed part by part

A read takes one snapshot of the table (its latest version): the date's live files, grouped by the run folder
that staged them, whose `_manifest.json` gives each file's checksum, size and user range (the lookup index). A
date re-published while it is read keeps its old files until a vacuum, so a read is consistent.

User ids follow pipeline.io.ids (the rule ingestion and inference apply), dates pipeline.io.dates. Every part
is checked against the sha256 its manifest records before any of its rows is returned: a damaged part is a
DataError, never silently different scores. A part is verified once per process (`_VERIFIED`, keyed by its
path, checksum, size and modification time): the first read of a part reads it whole, later lookups read only
the row groups they need. (Published parts are never rewritten in place; an in-place overwrite of the same size
within the same second of S3's modification times would go unnoticed by a process that verified it before.)
"""

from __future__ import annotations

import bisect
import contextlib
import datetime as dt
import hashlib
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.errors import DataError
from pipeline.io import delta_table, lake
from pipeline.io.dates import parse_date
from pipeline.io.ids import check_id
from pipeline.io.publish import MANIFEST
from pipeline.serving import layout
from pipeline.serving.sharding import scheme_for, shard_of

_INT = re.compile(r"^-?[0-9]+$")
MAX_USERS = 100_000
VERIFIED_MAX = 4096  # parts remembered as verified
_VERIFIED: OrderedDict[tuple[str, str, int, int | None], None] = OrderedDict()
_verified_lock = threading.Lock()


_tables: dict[str, Any] = {}  # table root URI → its DeltaTable, brought up to date on each read
_tables_lock = threading.Lock()


def _snapshot(out_uri: str) -> tuple[lake.Location, pa.Table | None, int]:
    """The table's live files (path, size, rows, date) at its latest version, and that version; (root, None, -1)
    when there is no table. The DeltaTable is kept per root and updated incrementally (one listing of the log)."""
    root = layout.recommendations_root(out_uri)
    with _tables_lock:
        table = _tables.get(root.uri)
        if table is not None:
            try:
                table.update_incremental()
            except Exception:  # vanished or rewritten table: open it afresh
                table = None
        if table is None:
            table = delta_table.open_table(root)
            if table is None:
                _tables.pop(root.uri, None)
                return root, None, -1
            _tables[root.uri] = table
        return root, delta_table.live_files(table), table.version()


def committed_dates(out_uri: str) -> list[dt.date]:
    """Dates with committed recommendations (live files in the table), newest first."""
    _, files, _ = _snapshot(out_uri)
    if files is None:
        return []
    return sorted(set(files.column("date").to_pylist()), reverse=True)


def resolve_date(out_uri: str, date: str | dt.date) -> dt.date:
    """A date, or 'latest': the newest committed date under OUT."""
    if date == "latest":
        dates = committed_dates(out_uri)
        if not dates:
            raise DataError(f"no committed recommendations under {layout.recommendations_root(out_uri).uri}",
                            "run `recsys infer` first, or check --out")
        return dates[0]
    return parse_date(date)


def _user_filter(table_type: pa.DataType, user_ids: Iterable[Any]) -> pa.Array:
    """The asked ids (pipeline.io.ids' rule, as at ingestion) typed like the partition's user_id: digit strings
    become integers only for an integer partition; a string partition is matched on the exact text ("007" is not
    "7")."""
    ids = [check_id(u, "user id") for u in user_ids]
    if len(ids) > MAX_USERS:
        raise DataError(f"{len(ids)} user ids asked for", f"ask for at most {MAX_USERS} at a time, or read the whole date")
    if not pa.types.is_integer(table_type):
        return pa.array([str(u) for u in ids], pa.string())
    for u in ids:
        if isinstance(u, str) and not _INT.match(u):
            raise DataError(f"user id {u[:40]!r} is not an integer, but this partition has integer user ids",
                            "pass integer ids")
    return pa.array([check_id(int(u), "user id") for u in ids], pa.int64())


def files_for_users(manifest: dict[str, Any], wanted: pa.Array) -> list[dict[str, Any]]:
    """The manifest's part files that can hold any of `wanted` (typed like the partition's user_id).

    Two indexes, both optional (older partitions have neither, and then every file is a candidate): the
    shard each part holds under a user-hash scheme this reader knows (local engine: one part per shard),
    and each part's user range (both engines; the Spark engine writes disjoint ranges)."""
    files: list[dict[str, Any]] = list(manifest.get("files", []))
    if len(wanted) == 0:
        return []
    sharding = manifest.get("user_sharding") or {}
    if (sharding.get("scheme") == scheme_for(wanted.type) and isinstance(sharding.get("n_shards"), int)
            and sharding["n_shards"] > 0 and all("shard" in f for f in files)):
        shards = set(shard_of(wanted, sharding["n_shards"]).tolist())
        files = [f for f in files if f["shard"] in shards]
    keys = _sorted_keys(wanted)
    return [f for f in files if _may_hold(keys, f.get("user_min"), f.get("user_max"))]


def _sorted_keys(wanted: pa.Array) -> list[Any]:
    return sorted(set(wanted.to_pylist()))


def _may_hold(keys: list[Any], lo: Any, hi: Any) -> bool:
    """Whether [lo, hi] (a part's or a row group's user range) holds one of the sorted `keys`; True when the
    range is unknown or of another type (then it must be read)."""
    if lo is None or hi is None or type(lo) is not type(keys[0]) or type(hi) is not type(keys[0]):
        return True
    i = bisect.bisect_left(keys, lo)
    return i < len(keys) and keys[i] <= hi


def _open_committed(out_uri: str, date: str | dt.date) -> tuple[dt.date, lake.Location, lake.Location, dict[str, Any]]:
    """The date's snapshot: (day, table root, table root, manifest), the manifest merged from the run folders of
    the date's live files: its `files` are their manifest entries with paths under the table root (so the second
    location, where parts are read from, is the root too), plus the table `version` and the run(s)."""
    day = resolve_date(out_uri, date)
    root, files, version = _snapshot(out_uri)
    live = None if files is None else delta_table.live_files_of(files, day)
    if not live:
        where = layout.partition(out_uri, day).uri
        raise DataError(f"no committed recommendations for {day} under {where}",
                        "run `recsys infer --date` for that date, or use --date latest")
    by_run: dict[str, dict[str, int]] = {}
    for path, size in live:
        folder, _, name = path.rpartition("/")
        by_run.setdefault(folder, {})[name] = size
    entries: list[dict[str, Any]] = []
    manifests = []
    for folder, sizes in sorted(by_run.items()):
        manifest = _read_manifest(root, folder, day)
        manifests.append(manifest)
        known = {str(f.get("path")): f for f in manifest["files"] if isinstance(f, dict)}
        for name, size in sorted(sizes.items()):
            loc = root.join(folder, name)
            entry = known.get(name)
            if entry is None:
                raise _damaged(loc, day, f"is not listed in {MANIFEST} of its run (no checksum to verify it)")
            if entry.get("bytes") != size:
                raise _damaged(loc, day, f"has {entry.get('bytes')} bytes in its manifest, {size} in the table's log")
            entries.append({**entry, "path": f"{folder}/{name}"})
    versions = {str(m.get("model_version", "")) for m in manifests}
    merged: dict[str, Any] = {"files": entries, "version": version, "run": ",".join(sorted(by_run)),
                              "model_version": versions.pop() if len(versions) == 1 else ""}
    if len(manifests) == 1:  # the shard index holds within one run only
        merged["user_sharding"] = manifests[0].get("user_sharding")
    return day, root, root, merged


def date_manifest(out_uri: str, date: str | dt.date = "latest") -> dict[str, Any]:
    """The published date's run manifest (model version, counts, checks, monitoring); for a date assembled from
    several runs, the first run's, with every run in `run`."""
    day, root, _, merged = _open_committed(out_uri, date)
    first = merged["run"].split(",")[0]
    return _read_manifest(root, first, day) | {"run": merged["run"]}


def _read_manifest(root: lake.Location, folder: str, day: dt.date) -> dict[str, Any]:
    loc = root.join(folder, MANIFEST)
    fix = f"re-run inference for {day} (`recsys infer --date {day}`), or restore an earlier version (`recsys restore`)"
    try:
        body = loc.read_bytes()
    except FileNotFoundError as e:
        raise DataError(f"the recommendations for {day} have no manifest: {loc.uri} is missing", fix) from e
    try:
        parsed = json.loads(body)
    except ValueError as e:
        raise DataError(f"the recommendations for {day} have an unreadable manifest: {loc.uri} is not JSON ({e})",
                        fix) from e
    if not isinstance(parsed, dict) or not isinstance(parsed.get("files"), list):
        raise DataError(f"the recommendations for {day} have an unreadable manifest: {loc.uri} lists no files", fix)
    return parsed


def _user_type(run: lake.Location, manifest: dict[str, Any], day: dt.date) -> pa.DataType:
    files = manifest.get("files") or []
    if not files:
        return pa.int64()
    known = {type(f.get("user_min")) for f in files}
    if known == {int}:  # the manifest's user ranges tell the type: no request to the store
        return pa.int64()
    if known == {str}:
        return pa.string()
    with _open_part(run, files[0], day) as pf:
        return pf.schema_arrow.field("user_id").type


def _damaged(loc: lake.Location, day: dt.date, why: str) -> DataError:
    return DataError(f"recommendation part {loc.uri} {why}: it was damaged or changed after publishing",
                     f"re-run inference for {day} (`recsys infer --date {day}`) to publish it again")


@contextlib.contextmanager
def _open_part(run: lake.Location, entry: dict[str, Any], day: dt.date) -> Iterator[pq.ParquetFile]:
    """A part file as a ParquetFile whose bytes match the sha256 (and size) its manifest entry records; DataError
    otherwise. Verified once per process: the first time its bytes are read whole and hashed (then parsed from
    memory, not read again); later, while its size and modification time stay the same, it is opened for
    ranged reads. FileNotFoundError when it is gone (a re-run replaced the date: callers read the pointer again)."""
    loc = run.join(str(entry.get("path", "")))
    want, size = entry.get("sha256"), entry.get("bytes")
    if not isinstance(want, str):
        raise _damaged(loc, day, "has no checksum in its manifest")
    info = loc.fs.get_file_info(loc.path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(loc.uri)
    if isinstance(size, int) and info.size != size:
        raise _damaged(loc, day, f"has {info.size} bytes, its manifest says {size}")
    key = (loc.uri, want, info.size, info.mtime_ns)
    with _verified_lock:
        known = key in _VERIFIED
        if known:
            _VERIFIED.move_to_end(key)
    if known:
        with loc.fs.open_input_file(loc.path) as f:
            yield pq.ParquetFile(f, pre_buffer=True)
        return
    with loc.fs.open_input_stream(loc.path) as f:
        data = f.read_buffer()
    if hashlib.sha256(data).hexdigest() != want:
        raise _damaged(loc, day, "does not match the sha256 in its manifest")
    with _verified_lock:
        _VERIFIED[key] = None
        while len(_VERIFIED) > VERIFIED_MAX:
            _VERIFIED.popitem(last=False)
    yield pq.ParquetFile(pa.BufferReader(data))


def _row_groups_for(meta: pq.FileMetaData, keys: list[Any]) -> list[int]:
    """Row groups whose user_id statistics can hold one of the sorted `keys` (all, where there are none)."""
    col = meta.schema.to_arrow_schema().get_field_index("user_id")
    stats = [meta.row_group(g).column(col).statistics for g in range(meta.num_row_groups)]
    return [g for g, st in enumerate(stats)
            if st is None or not st.has_min_max or _may_hold(keys, st.min, st.max)]


def _read_part(run: lake.Location, entry: dict[str, Any], day: dt.date, columns: list[str] | None,
               wanted: pa.Array | None = None) -> pa.Table:
    """One part file (verified, `_open_part`), or only its rows for `wanted` users: the footer, then the row
    groups that can hold them (once verified, on S3: one HEAD and two ranged GETs for a point lookup)."""
    with _open_part(run, entry, day) as pf:
        if wanted is None:
            return pf.read(columns=columns)
        keys = _sorted_keys(wanted)
        need = None if columns is None else list(dict.fromkeys([*columns, "user_id"]))
        table = pf.read_row_groups(_row_groups_for(pf.metadata, keys), columns=need)
        table = table.filter(pc.is_in(table.column("user_id"), value_set=wanted))
        return table if columns is None else table.select(columns)


def read_recommendations(out_uri: str, date: str | dt.date = "latest", user_ids: Iterable[Any] | None = None,
                         columns: list[str] | None = None) -> pa.Table:
    """The committed recommendations of `date` ('latest': newest committed date), optionally a few users.

    With `user_ids`, only the parts that can hold them are opened (the manifest's shard and range index) and
    only their row groups that can hold them are read (Parquet statistics: parts are sorted by user), so a
    lookup reads megabytes whatever the size of the date (after each part's first, verifying read). For a whole
    large date prefer `iter_recommendations`, which streams. Raises DataError when the date has no committed
    partition (absent, or a run that never finished), for an id that breaks pipeline.io.ids' rule, and for a
    part whose bytes do not match its manifest's checksum."""
    ids = None if user_ids is None else list(user_ids)
    for attempt in range(3):  # a re-run may delete the folder we were pointed at: re-read the pointer
        day, _, run, manifest = _open_committed(out_uri, date)
        try:
            if ids is None:
                tables = [_read_part(run, f, day, columns) for f in manifest["files"]]
            else:
                wanted = _user_filter(_user_type(run, manifest, day), ids)
                tables = [_read_part(run, f, day, columns, wanted) for f in files_for_users(manifest, wanted)]
        except (OSError, pa.ArrowInvalid) as e:
            if attempt == 2:
                raise DataError(f"cannot read the recommendations for {day} in {run.uri}: {str(e).splitlines()[0]}",
                                f"check access to the lake and retry; if a part is damaged, re-run inference for {day}"
                                ) from e
            continue
        break
    table = pa.concat_tables(tables) if tables else _empty(columns)
    return table.replace_schema_metadata({"dt": day.isoformat(), "model_version": str(manifest.get("model_version", "")),
                                          "version": str(manifest["version"])})


def iter_recommendations(out_uri: str, date: str | dt.date = "latest", batch_size: int = 65_536,
                         columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """Stream a committed date as record batches, part by part: memory stays at one part file's bytes (each is
    verified against its checksum before its first batch) and one batch, whatever the number of users (for bulk
    consumers: loading a key-value store, exporting).

    The date's files are resolved once (one snapshot of the table). A re-run meanwhile leaves them in place; only a
    vacuum deletes them, and the iteration then stops with a DataError (read again from the start) rather than
    mixing runs."""
    day, _, run, manifest = _open_committed(out_uri, date)
    for f in manifest["files"]:
        try:
            with _open_part(run, f, day) as pf:
                yield from pf.iter_batches(batch_size=batch_size, columns=columns)
        except OSError as e:  # FileNotFoundError included: a vacuum removed the files of a replaced version
            try:
                now = _open_committed(out_uri, day)[3]
            except DataError:
                now = None
            if now is None or now["version"] != manifest["version"]:
                raise DataError(f"recommendations for {day} were replaced by a re-run while being read",
                                "read them again from the start") from e
            raise


def _empty(columns: list[str] | None) -> pa.Table:
    table = pa.table({"user_id": pa.array([], pa.int64()), "item_ids": pa.array([], pa.list_(pa.int64())),
                      "scores": pa.array([], pa.list_(pa.float32())), "model_version": pa.array([], pa.string()),
                      "fallback": pa.array([], pa.bool_())})
    return table.select(columns) if columns else table


def user_recommendations(out_uri: str, date: str | dt.date, user_id: Any) -> dict[str, Any]:
    """One user's list: {'date', 'user_id', 'model_version', 'fallback', 'items': [(item, score), ...]}."""
    uid = check_id(user_id, "user id")
    table = read_recommendations(out_uri, date, [uid])
    meta = table.schema.metadata or {}
    day = meta.get(b"dt", b"").decode()
    if table.num_rows == 0:
        raise DataError(f"user {uid!r} has no recommendations for {day}", "check the user id (inactive users get none)")
    row = table.slice(0, 1).to_pylist()[0]
    return {"date": day, "user_id": row["user_id"], "model_version": row["model_version"], "fallback": row["fallback"],
            "items": list(zip(row["item_ids"], row["scores"], strict=True))}
