"""Publishing one date of a dataset in the lake (local folder or s3://) as one commit of a Delta Lake table.

Layout (pipeline.io.delta_table):

    <root>/_delta_log/...                                  the commits: the live files of each date
    <root>/dt=YYYY-MM-DD/run-<id>/part-00000.parquet ...   the data of one run (no dt column)
    <root>/dt=YYYY-MM-DD/run-<id>/_manifest.json           files, rows, checksums, user ranges, model version

A run's files are staged in its own folder (by this process or by Spark executors, `write_part_file`), invisible
to every reader: nothing in the log names them. `commit` writes the manifest (fsynced on a local disk, like the
parts), then makes the run's files the date's files in ONE Delta commit that also removes the date's previous
files, with the manifest's facts (model version, precision, counts, run id) in the commit's metadata. A crash at
any point leaves the previous commit or the new one, never a mix; a crashed run's folder stays invisible until a
vacuum removes it.

Runs of the same date may overlap (an Airflow retry while a zombie attempt lives, a manual re-run). A re-run
replaces the date; two commits racing for the same date cannot both win: the loser gets a DataError, its staged
folder is removed and the table is as the winner left it (delta_table's concurrency notes). Replaced runs'
folders stay, so a date can be restored (pipeline.serving.restore), until a vacuum with a retention.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.errors import DataError
from pipeline.io import delta_table
from pipeline.io.lake import Location

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
RUN_PREFIX = "run-"
ROW_GROUP_ROWS = 20_000


def hook(point: str) -> None:
    """Test hook: when RECSYS_HOOK_POINT names `point`, announce it in RECSYS_HOOK_FILE and sleep, so that
    a test can SIGKILL the process at a known place. Inert otherwise (one env lookup)."""
    if os.environ.get("RECSYS_HOOK_POINT") != point:
        return
    marker = os.environ.get("RECSYS_HOOK_FILE")
    if marker:
        with open(marker, "w") as f:
            f.write(point)
    time.sleep(float(os.environ.get("RECSYS_HOOK_SLEEP", "60")))


def parquet_encodings(schema: pa.Schema) -> dict[str, Any]:
    """Per-column Parquet encodings: floating-point leaves (the scores, nearly all distinct) are PLAIN without a
    dictionary, which Arrow would build and then drop; the rest keep the dictionary default. A synthetic 100k-user
    top-100 table: 52.1 MiB / 269 ms against 55.0 MiB / 339 ms with the dictionary (docs/benchmarks.md). Not
    BYTE_STREAM_SPLIT (47.1 MiB): Spark before 4.1 (EMR's emr-spark-8.0.0 ships 4.0.2) fails on it in its vectorised
    reader, and downstream jobs read the parts with Spark (tests/pipeline/orchestration/test_emr_spark_release.py)."""
    floats: list[str] = []
    others: list[str] = []
    for f in schema:
        t, path = f.type, f.name
        if pa.types.is_list(t) or pa.types.is_large_list(t):
            t, path = t.value_type, f"{f.name}.list.element"
        (floats if pa.types.is_floating(t) else others).append(path)
    return {"use_dictionary": others, "column_encoding": dict.fromkeys(floats, "PLAIN")}


def part_bytes(table: pa.Table) -> bytes:
    """A part file's bytes: deterministic for the same table (no timestamps in Parquet metadata), so a re-run gives
    equal checksums. Row groups of 20k rows (~8-9 MB at top-100): a point lookup reads one, while scans lose ~4%
    to compression."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=ROW_GROUP_ROWS, **parquet_encodings(table.schema))
    return buf.getvalue()


def write_part_file(loc: Location, table: pa.Table) -> dict[str, Any]:
    """Write `table` as the part file `loc` (fsynced on a local disk); returns its manifest entry (path: the name).
    Used in the process that holds the rows: the driver (`PartitionWriter.write_part`) or a Spark executor."""
    data = part_bytes(table)
    loc.write_bytes(data)
    if _is_local(loc):
        fsync_path(loc.path)  # here, in the writing thread or task, rather than serially in commit
    return {"path": loc.path.rstrip("/").rsplit("/", 1)[-1], "rows": table.num_rows, "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}


_last_run_us = 0
_run_id_lock = threading.Lock()


def new_run_id() -> str:
    """UTC start time to the microsecond, then a random suffix: ids of one date sort by start time (cleanup
    relies on it). Strictly increasing within a process, so writers created back to back are ordered too."""
    global _last_run_us
    with _run_id_lock:
        _last_run_us = us = max(time.time_ns() // 1000, _last_run_us + 1)
    seconds, micro = divmod(us, 1_000_000)
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(seconds))}.{micro:06d}-{secrets.token_hex(4)}"


def _is_local(loc: Location) -> bool:
    return isinstance(loc.fs, pafs.LocalFileSystem)


def fsync_path(path: str) -> None:
    """fsync a local file or folder (a folder: its entries, e.g. a rename into it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_single_object(loc: Location, data: bytes) -> None:
    """Write a small object so that readers see the old content or the new one, never a torn file, and durably
    (Location.write_bytes: on a local disk a temporary file, fsynced, renamed over the target)."""
    loc.write_bytes(data, durable=True)


def _parent(loc: Location) -> Location:
    return Location(loc.fs, loc.path.rstrip("/").rsplit("/", 1)[0], loc.uri.rstrip("/").rsplit("/", 1)[0])


@dataclass
class PartitionWriter:
    """Writes one run of a date of the Delta table `<root>`: `write_part` (or `record_part`) for each part, then
    `commit(extra)`. `partition` is `<root>/dt=YYYY-MM-DD`, where the run's folder is staged.

    Nothing is visible to readers before `commit`; `abort` removes the run's folder."""

    partition: Location  # <root>/dt=DATE
    run_id: str = field(default_factory=new_run_id)
    files: list[dict[str, Any]] = field(default_factory=list)
    rows: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _taken: set[str] = field(default_factory=set, repr=False, compare=False)
    _schema: pa.Schema | None = field(default=None, repr=False, compare=False)
    date: dt.date = field(init=False, compare=False)  # from the partition's name

    def __post_init__(self) -> None:
        name = self.partition.path.rstrip("/").rsplit("/", 1)[-1]
        if not name.startswith(f"{delta_table.PARTITION}="):
            raise ValueError(f"{self.partition.uri} is not a {delta_table.PARTITION}= partition")
        self.date = dt.date.fromisoformat(name.split("=", 1)[1])
        self.partition.check_writable()  # --out a file, or not writable: one clear error before any work

    @property
    def table(self) -> Location:
        """The Delta table's root (the partition's parent)."""
        return _parent(self.partition)

    @property
    def run_name(self) -> str:
        return RUN_PREFIX + self.run_id

    @property
    def run_dir(self) -> Location:
        return self.partition.join(self.run_name)

    def write_part(self, table: pa.Table, part: int | None = None, **index: Any) -> dict[str, Any]:
        """Write one part file; `index` (JSON values, e.g. the part's shard and user range) goes into its
        manifest entry, for readers that look up a few keys without opening every file.

        Thread-safe. `part` names the file (part-NNNNN) so that parts written concurrently, finishing in any
        order, get the same names and manifest order on every run; default: the next number."""
        with self._lock:  # the name is taken before the (slow) upload
            name = f"part-{len(self._taken) if part is None else part:05d}.parquet"
            if name in self._taken:
                raise ValueError(f"{name} was written twice in run {self.run_name}")
            self._taken.add(name)
            if self._schema is None:
                self._schema = table.schema
        entry = {**write_part_file(self.run_dir.join(name), table), **index}
        with self._lock:
            self.files.append(entry)
            self.rows += table.num_rows
            written = len(self.files)
        hook(f"part-{written - 1}")
        return entry

    def record_part(self, entry: dict[str, Any]) -> None:
        """Take into this run a part another process wrote into `run_dir` with `write_part_file` (a Spark executor);
        `entry` is what that call returned, plus its index keys."""
        name = entry["path"]
        with self._lock:
            if name in self._taken:
                raise ValueError(f"{name} was written twice in run {self.run_name}")
            self._taken.add(name)
            self.files.append(dict(entry))
            self.rows += int(entry["rows"])

    @property
    def partition_name(self) -> str:
        return f"{delta_table.PARTITION}={self.date.isoformat()}"

    def _files_schema(self, files: list[dict[str, Any]]) -> pa.Schema:
        if self._schema is not None:
            return self._schema
        if not files:
            return pa.schema([])
        first = self.run_dir.join(files[0]["path"])
        with first.fs.open_input_file(first.path) as f:
            return pq.read_schema(f)  # parts written elsewhere (Spark executors): one footer read

    def commit(self, extra: dict[str, Any]) -> dict[str, Any]:
        """Write the manifest, then commit the run's parts as the date's files (pipeline.io.delta_table.commit_date);
        returns the manifest, plus the committed table `version`. A DataError (the run's folder removed, the table
        untouched) when a concurrent commit of the date won, the table has another schema, or a part vanished."""
        with self._lock:
            if len(self.files) != len(self._taken):
                raise RuntimeError("commit while a part is still being written")
            files = sorted(self.files, key=lambda f: f["path"])
        try:
            schema = self._files_schema(files)
            if delta_table.PARTITION in schema.names:
                raise DataError(f"run {self.run_name} of {self.partition.uri} has a {delta_table.PARTITION!r} column in "
                                "its parts: Delta keeps the partition value in the log, not in the data files",
                                f"drop the {delta_table.PARTITION!r} column from the tables given to write_part")
            manifest = {**extra, "run": self.run_name, "files": files, "rows": self.rows}
            body = json.dumps(manifest, indent=2, sort_keys=True, default=str).encode()
            self.run_dir.join(MANIFEST).write_bytes(body)
            if _is_local(self.run_dir):  # parts were fsynced by write_part; their names and the folder's here
                for path in (self.run_dir.join(MANIFEST).path, self.run_dir.path, self.partition.path):
                    fsync_path(path)
            hook("manifest")
            missing = sorted({f["path"] for f in files} - set(self.run_dir.list()))
            if missing:
                raise DataError(f"run {self.run_name} of {self.partition.uri} was not published "
                                f"({', '.join(missing[:3])} vanished from its folder: a vacuum or a person removed it)",
                                "re-run the date")
            snapshot = delta_table.open_table(self.table)
            hook("delta-read")  # a test seam: two writers that both read the table before either commits
            facts = {k: v for k, v in manifest.items() if k != "files"} | {"n_files": len(files), "operation": "publish"}
            data = [delta_table.DataFile(f"{self.partition_name}/{self.run_name}/{f['path']}", int(f["bytes"]),
                                         int(f["rows"]), f.get("user_min"), f.get("user_max")) for f in files]
        except BaseException:
            self.abort()
            raise
        try:
            version = delta_table.commit_date(self.table, self.date, data, schema, facts, table=snapshot)
        except delta_table.CommitRefused:
            self.abort()  # refused: nothing names these files
            raise
        # any other failure: the commit may or may not have landed, so the files stay (a vacuum removes them if not)
        hook("commit")
        return {**manifest, "version": version}

    def abort(self) -> None:
        """Remove this run's folder, best effort: it is called while another error propagates (which must not be
        replaced), and an uncommitted folder is invisible to readers and removed by a vacuum."""
        try:
            self.run_dir.delete()
        except Exception as e:
            log.warning("could not remove the uncommitted run %s (%s); a vacuum of the table removes it",
                        self.run_dir.uri, e)
