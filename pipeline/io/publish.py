"""Atomic publishing of one date's partition of a dataset in the lake (local folder or s3://).

Layout of a partition:

    <root>/dt=YYYY-MM-DD/run-<id>/part-00000.parquet ...   the data of one run
    <root>/dt=YYYY-MM-DD/run-<id>/_manifest.json           files, rows, checksums, model version
    <root>/dt=YYYY-MM-DD/_SUCCESS                          {"run": "run-<id>", "manifest_sha256": ...}

`_SUCCESS` is the commit point: one single-object write (an S3 PUT, or a rename on a local disk) that names
the run folder readers must use. Until it is written, readers keep seeing the previous run (its folder is
untouched) or nothing. On a local disk the parts and the manifest are fsynced before it, so a power loss
cannot leave it pointing at empty files. A crash at any point therefore leaves either the previous complete
partition or the new complete one visible, never a mix.

Runs of the same date may overlap (an Airflow retry while a zombie attempt lives, a manual re-run). Run ids
sort by start time, and the newest started run wins:
- after its commit a run deletes only older run folders (the replaced run, crashed runs, an older run still
  writing); a newer run's folder is left to that run, which deletes this one when it commits;
- before its commit a run checks that every file it wrote is still there (a newer run's commit deletes older
  runs) and that `_SUCCESS` does not name a newer run; if either fails it removes its folder and raises,
  leaving `_SUCCESS` as it was.
One race is left, as no check-then-write can close it on S3: a newer run that commits between an older run's
checks and its `_SUCCESS` write, deleting the older run, leaves `_SUCCESS` naming a deleted folder; readers then
get a clear DataError until the date is re-run.
"""

from __future__ import annotations

import contextlib
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
from pipeline.io.lake import Location, is_temporary

log = logging.getLogger(__name__)

SUCCESS = "_SUCCESS"
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


def parquet_encodings(schema: pa.Schema) -> dict[str, list[str]]:
    """Per-column Parquet encodings: floating-point leaves (the scores, nearly all distinct) get BYTE_STREAM_SPLIT
    and no dictionary, which Arrow would build and then drop; the rest keep the dictionary default. bench-recs'
    1M-user partition: 469 MiB instead of 551; bench-infer's write phase: 6.8 s instead of 8.2-8.6."""
    floats: list[str] = []
    others: list[str] = []
    for f in schema:
        t, path = f.type, f.name
        if pa.types.is_list(t) or pa.types.is_large_list(t):
            t, path = t.value_type, f"{f.name}.list.element"
        (floats if pa.types.is_floating(t) else others).append(path)
    return {"use_dictionary": others, "use_byte_stream_split": floats}


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


@dataclass
class PartitionWriter:
    """Writes one run of a date partition: `write_part` for each table, then `commit(extra)`.

    Nothing is visible to readers before `commit`; `abort` removes the run's folder."""

    partition: Location  # <root>/dt=DATE
    run_id: str = field(default_factory=new_run_id)
    files: list[dict[str, Any]] = field(default_factory=list)
    rows: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _taken: set[str] = field(default_factory=set, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.partition.check_writable()  # --out a file, or not writable: one clear error before any work

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

    def commit(self, extra: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            if len(self.files) != len(self._taken):
                raise RuntimeError("commit while a part is still being written")
            files = sorted(self.files, key=lambda f: f["path"])
        manifest = {**extra, "run": self.run_name, "files": files, "rows": self.rows}
        body = json.dumps(manifest, indent=2, sort_keys=True, default=str).encode()
        self.run_dir.join(MANIFEST).write_bytes(body)
        if _is_local(self.run_dir):  # parts were fsynced by write_part; their names and the folder's here
            for path in (self.run_dir.join(MANIFEST).path, self.run_dir.path, self.partition.path):
                fsync_path(path)
        hook("manifest")
        self._check_before_commit([f["path"] for f in files])
        pointer = {"run": self.run_name, "manifest_sha256": hashlib.sha256(body).hexdigest(), "rows": self.rows}
        write_single_object(self.partition.join(SUCCESS), json.dumps(pointer, sort_keys=True).encode())
        hook("success")
        self.cleanup()
        return manifest

    def _check_before_commit(self, parts: list[str]) -> None:
        """Raise (after removing this run's folder) when a newer run for this date deleted files of this run or
        has committed already: this run must not replace it. `_SUCCESS` is left as it was."""
        missing = sorted({*parts, MANIFEST} - set(self.run_dir.list()))
        newer: Any = None
        if not missing:
            with contextlib.suppress(FileNotFoundError):  # no commit yet
                raw = self.partition.join(SUCCESS).read_bytes()
                with contextlib.suppress(ValueError):  # an unreadable commit: this run replaces it
                    newer = json.loads(raw)
            newer = newer.get("run") if isinstance(newer, dict) else None
            if not (isinstance(newer, str) and newer > self.run_name):
                return
        self.abort()
        if missing:
            why = f"{', '.join(missing[:3])} vanished from its folder: a newer run for this date removed it"
        else:
            why = f"a newer run, {newer}, has committed this date already"
        raise DataError(f"run {self.run_name} of {self.partition.uri} was not published ({why})",
                        "let one run per date finish; re-run the date if the newer run did not publish it")

    def cleanup(self) -> None:
        """Delete the run folders older than this run (the replaced run, crashed runs, an older run still being
        written) and stale `_SUCCESS` temporary files. Newer run folders belong to runs that may still be
        writing: the newest run deletes the rest when it commits."""
        for name in self.partition.list():
            if (name.startswith(RUN_PREFIX) and name < self.run_name) or is_temporary(name, SUCCESS):
                self.partition.join(name).delete()

    def abort(self) -> None:
        """Remove this run's folder, best effort: it is called while another error propagates (which must not be
        replaced), and an uncommitted folder is invisible to readers and removed by the date's next run."""
        try:
            self.run_dir.delete()
        except Exception as e:
            log.warning("could not remove the uncommitted run %s (%s); the next run of the date removes it",
                        self.run_dir.uri, e)


def committed_run(partition: Location) -> tuple[Location, dict[str, Any]] | None:
    """The committed run folder and its manifest, or None when the partition has no `_SUCCESS`.

    Two reads (pointer, manifest), no listing. A re-run that commits between them deletes the run the
    pointer named; the pointer is then read again. A corrupt `_SUCCESS` or manifest, or a manifest that is
    missing, is a DataError naming the file."""
    success = partition.join(SUCCESS)
    fix = "re-run the job for that date"
    for attempt in range(3):
        try:
            raw = success.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise DataError(f"partition {partition.uri} has an unreadable commit: {success.uri} ({e})", fix) from e
        try:
            pointer = json.loads(raw)
        except ValueError as e:
            raise DataError(f"partition {partition.uri} has an unreadable commit: {success.uri} is not JSON ({e})",
                            fix) from e
        if not isinstance(pointer, dict) or not isinstance(pointer.get("run"), str):
            raise DataError(f"partition {partition.uri} has an unreadable commit: {success.uri} names no run", fix)
        run = partition.join(pointer["run"])
        manifest = run.join(MANIFEST)
        try:
            body = manifest.read_bytes()
        except FileNotFoundError as e:
            if attempt < 2:
                continue  # replaced meanwhile (or never there: the next attempts say so)
            raise DataError(f"partition {partition.uri} has an unreadable commit: {manifest.uri}, named by "
                            f"{SUCCESS}, is missing", fix) from e
        except (OSError, ValueError) as e:
            if isinstance(e, DataError):
                raise
            raise DataError(f"partition {partition.uri} has an unreadable commit: {manifest.uri} ({e})", fix) from e
        break
    if hashlib.sha256(body).hexdigest() != pointer.get("manifest_sha256"):
        raise DataError(f"manifest of {run.uri} does not match its _SUCCESS", fix)
    try:
        parsed = json.loads(body)
    except ValueError as e:
        raise DataError(f"partition {partition.uri} has an unreadable commit: {manifest.uri} is not JSON ({e})",
                        fix) from e
    if not isinstance(parsed, dict) or not isinstance(parsed.get("files"), list):
        raise DataError(f"partition {partition.uri} has an unreadable commit: {manifest.uri} lists no files", fix)
    return run, parsed
