"""The weekly data build: events in a window -> one matrix snapshot (pipeline/io/snapshot.py's format).

``BuildMatrixJob(...).run()`` does, on Spark:

1. List the event partitions ``dt=YYYY-MM-DD`` of the window [as_of - window_days + 1, as_of] (a lake
   without ``dt=`` folders is read whole; its timestamps, when present, are filtered to the window). Local
   (or shared) paths are read by Spark where they are. Events on S3 are read directly as ``s3a://`` when
   ``read_direct`` (a cluster with the hadoop-aws jars, e.g. EMR), else staged to a temp folder on the driver
   first (no s3a jars here), which only a local master can read.
   Names starting with '.' or '_' (staging folders, markers) are skipped, as every Parquet reader does. A window
   that leaves the calendar (before 0001-01-01, or an as-of of 9999-12-31) is a DataError.
1b. Every file's Parquet footer is read with pyarrow before Spark starts: an empty, truncated or non-Parquet
   file, missing user_id/item_id, a type the schema gate refuses (an event_ts stored as a string or an integer
   epoch is refused, never parsed: seconds, milliseconds and text are ambiguous) or files that disagree on a
   column's type are each one DataError naming the file. Spark then reads with one explicit schema (ids int64 or
   string, every file alike), and a read error it still hits (a damaged data page) becomes a DataError too.
2. Measure the raw events in one pass and run the event gates (pipeline/data/dq.py) before anything else.
3. Collapse events into (user, item) pairs; a pair is positive when its largest weight passes the
   binarize rule (events without a weight column: every pair). Optional item min-count filter, then the
   user min-count filter (one pass each, as in pipeline/data/dataset.py).
4. Split by users with a hash of (seed, user_id): the per-user table is small, so it is collected and
   ordered by (hash, user_id) on the driver; the first n_valid are validation users, the next n_test test
   users, the rest train (a user keeps its role across weeks as long as the counts stay put).
5. Stable indices: users and items of the latest earlier snapshot under ``<out>/snapshots/`` keep their
   user_idx / item_idx; new ones are appended in id order. Items are the training items of this week plus
   every earlier item (columns never move; a column may be empty this week). Users of earlier snapshots who
   have no kept interaction this week stay in the users table with role ``inactive``, which the loader puts
   in no matrix (user_idx stays 0..n-1, as the loader requires).
6. Held-out users keep only items seen in training this week; per user, floor(target_fraction * n) items
   (1 when that is 0 and n >= 2, as model/split.py does) with the smallest hash of (seed, user, item) are
   targets, the rest fold-in.
7. The volume gates (against the previous manifest), then the tables are written under a new run folder and
   published by snapshot.publish (manifest last; the run it replaced is kept for readers still on it, older
   runs are removed; a failure before the manifest removes the new run).
8. Optional (`items`: the items contract as of the date, e.g. ``<out>/items/dt=AS_OF``): an ``item_metadata``
   table joins the metadata to the snapshot's columns and flags the cold items (no training click this week:
   titles newer than the window, or earlier columns without clicks now); validated before anything is written
   (a bad items file publishes nothing). Counts ``items_with_metadata`` and ``cold_items`` in the manifest.

The users and items tables (one row per user or item) are written by the driver. The (user_idx, item_idx)
tables, which grow with the events, are written by the executors (`_write_blocks`): rows go to blocks of
consecutive user_idx whose size depends only on the data (`part_rows`), each block is sorted and written as
``part-<block>.parquet`` by the task holding it, and the driver gets back (name, rows, bytes, sha256). A block's
bytes depend only on its rows, so the same input + seed gives the same files, hence the same content digest
(snapshot.content_digest), on local[N] and on a cluster of any size; a retried task rewrites identical bytes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, model_validator

from model.split import heldout_count as split_count
from pipeline.data import dq
from pipeline.data.dq import DQConfig
from pipeline.errors import DataError
from pipeline.io.items import read_items_uri
from pipeline.io.lake import Location, resolve
from pipeline.io.publish import hook
from pipeline.io.snapshot import (
    MANIFEST,
    content_digest,
    discard,
    manifest_digest,
    new_run_id,
    publish,
    read_manifest,
    read_table,
    table_bytes,
    write_tables,
)
from pipeline.io.spark import SparkConfig, apply_env, check_master, executor_env, spark_session
from pipeline.job import Job, JobResult

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession
    from pyspark.sql.types import DataType, StructType

logger = logging.getLogger(__name__)

SNAPSHOTS = "snapshots"
FIX_FILE = ("re-write that file (re-run `recsys ingest` or `recsys synth` for it), or move it out of the events "
            "folder")


class Binarize(BaseModel):
    """A pair is positive when max(weight) passes: ``ge``: >= threshold, ``gt``: > threshold, ``any``: always."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    op: Literal["ge", "gt", "any"] = "gt"
    threshold: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Binarize:
        """'weight>=4', '>=4', 'weight>0', '>0', 'any'."""
        t = text.replace("weight", "").replace(" ", "")
        if t in ("any", "all", "none"):
            return cls(op="any")
        for sym, op in ((">=", "ge"), (">", "gt")):
            if t.startswith(sym):
                try:
                    return cls(op=op, threshold=float(t[len(sym):]))
                except ValueError:
                    break
        raise DataError(f"cannot read the binarize rule {text!r}", "use 'weight>=4', 'weight>0' or 'any'")

    def describe(self) -> str:
        """The rule in words (for the manifest and messages)."""
        return "any event" if self.op == "any" else f"weight {'>=' if self.op == 'ge' else '>'} {self.threshold:g}"


class BuildResult(JobResult):
    """The published snapshot: where it is, its content digest (what training tags its versions with), counts."""

    snapshot_uri: str
    digest: str  # the manifest's (this build's identity: run id and config included)
    counts: dict[str, int]
    content_digest: str = ""  # the tables' content only: equal for the same input + seed on any engine or cluster


class BuildMatrixJob(Job):
    """One weekly build: events in the window → a matrix snapshot under OUT/snapshots/as_of=DATE."""

    events: str  # events root (dt=YYYY-MM-DD partitions, or Parquet without them): local path or s3://
    as_of: dt.date
    out: str  # lake root; the snapshot goes to <out>/snapshots/as_of=YYYY-MM-DD
    window_days: int = Field(28, ge=1)
    spark: SparkConfig = SparkConfig()  # where Spark runs
    spark_master: str | None = None  # shorthand for spark.master (the CLI, older callers); equal to it once built
    read_direct: bool = False  # S3 events: Spark reads s3a:// itself (EMR) instead of the driver staging them
    part_rows: int = Field(4_000_000, ge=1)  # about this many rows per train/heldout part file
    min_user_interactions: int = Field(5, ge=1)
    min_item_interactions: int = Field(1, ge=1)
    binarize: Binarize = Binarize()
    n_valid: int | float = 0.1  # a count, or a fraction in (0, 1) of the kept users
    n_test: int | float = 0.1
    target_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    seed: int = 0
    shuffle_partitions: int = Field(8, ge=1)
    driver_memory: str = "6g"  # only used when this job starts the Spark session
    dq: DQConfig = DQConfig()
    # the items contract (pipeline.io.items) as of the snapshot date, e.g. <out>/items/dt=AS_OF: joined into the
    # snapshot's optional item_metadata table (which items are cold: metadata, no training clicks); None: no table
    items: str | None = None

    @model_validator(mode="after")
    def _one_master(self) -> BuildMatrixJob:
        """`spark_master`, when given, is the master (it overrides spark.master); afterwards both agree."""
        if self.spark_master is not None and self.spark_master != self.spark.master:
            spark = self.spark.model_copy(update={"master": check_master(self.spark_master)})
            object.__setattr__(self, "spark", spark)  # frozen model: set once, while validating
        object.__setattr__(self, "spark_master", self.spark.master)
        return self

    @property
    def window_start(self) -> dt.date:
        """The first day of the window (AS_OF - window_days + 1); a DataError before 0001-01-01."""
        first = self.as_of.toordinal() - (self.window_days - 1)  # ordinals: no timedelta overflow on huge windows
        if first < 1:
            raise DataError(f"a window of {self.window_days} days up to {self.as_of} starts before the calendar's "
                            f"first day {dt.date.min}",
                            f"use at most {self.as_of.toordinal()} --window-days for --as-of {self.as_of}")
        return dt.date.fromordinal(first)

    @property
    def window_end(self) -> dt.date:
        """The day after AS_OF: the window's exclusive end; a DataError for AS_OF 9999-12-31."""
        if self.as_of >= dt.date.max:
            raise DataError(f"--as-of {self.as_of} is the calendar's last day: the window's end (the next day) "
                            "cannot be represented", "use an --as-of before 9999-12-31")
        return self.as_of + dt.timedelta(days=1)

    def snapshot_uri(self) -> str:
        """Where this build publishes: OUT/snapshots/as_of=DATE."""
        return resolve(self.out).join(SNAPSHOTS, f"as_of={self.as_of.isoformat()}").uri

    def run(self) -> BuildResult:
        """Build, gate and publish the snapshot; a failed gate or bad input raises DataError and publishes nothing."""
        uri = _build(self)
        manifest = read_manifest(uri)
        return BuildResult(snapshot_uri=uri, digest=manifest_digest(manifest), content_digest=content_digest(manifest),
                           counts={k: int(v) for k, v in manifest.get("counts", {}).items() if isinstance(v, int)})


@dataclass(frozen=True)
class _Inputs:
    files: list[pafs.FileInfo]
    partitioned: bool


# --------------------------------------------------------------------------------------------------
# Input listing and staging
# --------------------------------------------------------------------------------------------------


def _hidden(rel: str) -> bool:
    """Whether a path below the events root has a part starting with '.' or '_' (what readers skip)."""
    return any(part.startswith((".", "_")) for part in rel.split("/"))


def _parquet_files(loc: Location) -> list[pafs.FileInfo]:
    infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True))
    base = loc.path.rstrip("/") + "/"
    return sorted((i for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".parquet")
                   and not _hidden(i.path[len(base):] if i.path.startswith(base) else i.base_name)),
                  key=lambda i: i.path)


def _list_inputs(cfg: BuildMatrixJob) -> _Inputs:
    root = resolve(cfg.events)
    if not root.exists():
        raise DataError(f"events location {root.uri} does not exist",
                        "pass the folder written by `recsys ingest` or `recsys synth` (--events)")
    if root.is_file():
        return _Inputs([root.fs.get_file_info(root.path)], partitioned=False)
    names = root.list()
    days = [n for n in names if n.startswith("dt=")]
    if not days:
        return _Inputs(_parquet_files(root), partitioned=False)
    lo, hi = cfg.window_start.isoformat(), cfg.as_of.isoformat()
    files: list[pafs.FileInfo] = []
    for name in days:
        if lo <= name[3:] <= hi:  # ISO dates sort as strings
            files += _parquet_files(root.join(name))
    return _Inputs(files, partitioned=True)


def _stage(cfg: BuildMatrixJob, inputs: _Inputs, tmp: str) -> dict[str, str]:
    """Paths Spark reads (local files where they are, s3a:// URIs with read_direct, else copies of S3 objects under
    tmp) -> their URIs."""
    root = resolve(cfg.events)
    if isinstance(root.fs, pafs.LocalFileSystem):
        return {i.path: i.path for i in inputs.files}
    if cfg.read_direct:
        return {f"s3a://{i.path}": f"s3://{i.path}" for i in inputs.files}
    if not cfg.spark.local:
        raise DataError(f"events on S3 ({cfg.events}) would be staged to the driver's disk, which the executors of "
                        f"{cfg.spark.master} cannot read",
                        "set read_direct (Spark reads s3a:// itself: a cluster with hadoop-aws, e.g. EMR), or use a "
                        "local master (local[N])")
    paths = {}
    for k, info in enumerate(inputs.files):
        local = os.path.join(tmp, f"{k:06d}-{info.base_name}")
        pafs.copy_files(info.path, local, source_filesystem=root.fs, destination_filesystem=pafs.LocalFileSystem())
        paths[local] = f"s3://{info.path}"
    return paths


# --------------------------------------------------------------------------------------------------
# Input validation (pyarrow, footers only) and the one Spark schema
# --------------------------------------------------------------------------------------------------


def _arrow_kind(t: pa.DataType, physical: str | None) -> str:
    """A column's kind for the schema gate (dq.check_schema): int, string, float, timestamp or the type's name."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_integer(t):
        return "uint64" if t == pa.uint64() else "int"  # Spark cannot read uint64 as a long
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "float"
    if pa.types.is_timestamp(t):
        # Spark reads INT96 and ms/us timestamps; INT64 nanoseconds are an illegal Parquet type to it
        return "timestamp" if t.unit != "ns" or physical == "INT96" else "timestamp[ns]"
    return str(t)


@dataclass(frozen=True)
class _FileSchema:
    label: str
    kinds: dict[str, str]  # column -> kind, in file order
    types: dict[str, pa.DataType]


def _read_footer(path: str, label: str) -> _FileSchema:
    source: Any = path
    if path.startswith("s3a://"):  # read_direct: the footer through the lake's S3 filesystem
        loc = resolve("s3://" + path[len("s3a://"):])
        size = loc.fs.get_file_info(loc.path).size or 0
        source = loc.fs.open_input_file(loc.path) if size else None
    else:
        size = os.path.getsize(path)
    if size == 0:
        raise DataError(f"events file {label} is empty (0 bytes)", FIX_FILE)
    try:
        pf = pq.ParquetFile(source)
        schema = pf.schema_arrow
        physical = {pf.schema.column(k).path: pf.schema.column(k).physical_type for k in range(len(pf.schema))}
    except (pa.ArrowException, OSError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160].rstrip(": ")
        raise DataError(f"events file {label} is not a readable Parquet file ({first})", FIX_FILE) from err
    missing = [c for c in dq.REQUIRED if c not in schema.names]
    if missing:
        raise DataError(f"events file {label} lacks column(s) {', '.join(missing)} (columns: "
                        f"{', '.join(schema.names) or 'none'})",
                        "every events file needs user_id and item_id: re-ingest it (`recsys ingest`) or move it out "
                        "of the events folder")
    kinds = {f.name: _arrow_kind(f.type, physical.get(f.name)) for f in schema}
    return _FileSchema(label, kinds, {f.name: f.type for f in schema})


def _inspect_inputs(paths: dict[str, str]) -> tuple[dict[str, str], StructType]:
    """Footers of every input file: (the columns' kinds for the schema gate, the Spark schema to read with)."""
    from pyspark.sql import types as T

    files = [_read_footer(path, label) for path, label in paths.items()]
    for f in files:  # per file, so the message names the file
        dq.enforce([dq.check_schema(f.kinds)], f"events file {f.label}")
    first = files[0]
    fields: list[T.StructField] = []
    for col in (*dq.REQUIRED, "weight", "event_ts"):
        having = [f for f in files if col in f.kinds]
        if not having:
            continue
        if len(having) < len(files):
            without = next(f for f in files if col not in f.kinds)
            raise DataError(f"events files disagree on column {col}: {having[0].label} has it, {without.label} "
                            "does not", "re-ingest the events so every file has the same columns")
        fields.append(T.StructField(col, _spark_type(col, having)))
    return dict(first.kinds), T.StructType(fields)  # the files agree on every column read (checked above)


def _spark_type(col: str, files: list[_FileSchema]) -> DataType:
    """The one Spark type a column is read as in every file (Spark fails on files that disagree)."""
    from pyspark.sql import types as T

    if col == "event_ts":
        return T.TimestampType()  # every kind passed the schema gate: timestamps, naive ones read as UTC
    kinds = {f.kinds[col] for f in files}
    arrow = {str(f.types[col]) for f in files}
    if col == "weight":
        decimals = {f.types[col] for f in files if pa.types.is_decimal(f.types[col])}
        ints = all(pa.types.is_integer(f.types[col]) for f in files)
        floats = all(pa.types.is_floating(f.types[col]) for f in files)
        if ints:
            return T.LongType()
        if floats:
            return T.DoubleType()
        if len(decimals) == 1 and len(arrow) == 1:
            d = next(iter(decimals))
            return T.DecimalType(d.precision, d.scale)
    elif len(kinds) == 1:
        return T.LongType() if kinds == {"int"} else T.StringType()
    a = files[0]
    b = next(f for f in files if str(f.types[col]) != str(a.types[col]))
    raise DataError(f"events files disagree on the type of {col}: {a.types[col]} in {a.label}, {b.types[col]} in "
                    f"{b.label}", f"re-ingest the events so {col} has one type in every file")


_READ_ERRORS = ("FAILED_READ_FILE", "CANNOT_READ_FILE_FOOTER", "PARQUET_", "ParquetDecodingException",
                "is not a Parquet file", "Could not read footer")
_FILE_IN_ERROR = re.compile(r"file:(/\S+?)\.?(?:\s|$)")


def _spark_read_error(err: Exception, paths: dict[str, str], where: str) -> DataError | None:
    """A Spark error that is about reading the input files, as one line naming the file; None for others."""
    from urllib.parse import unquote

    text = str(err)
    if not any(marker in text for marker in _READ_ERRORS):
        return None
    first = next((line.strip() for line in text.splitlines()
                  if any(marker in line for marker in _READ_ERRORS)), "")
    cls = re.search(r"\[([A-Z_][A-Z0-9_.]*)\]", first)
    why = cls.group(1) if cls else first[:160]
    found = _FILE_IN_ERROR.search(text)
    if found:
        local = unquote(found.group(1)).replace("///", "/")
        label = paths.get(local, local)
        return DataError(f"Spark could not read events file {label} ({why})", FIX_FILE)
    return DataError(f"Spark could not read the {where} ({why})",
                     "find the damaged file in the Spark log, then re-write it or move it out of the events folder")


# --------------------------------------------------------------------------------------------------
# Spark
# --------------------------------------------------------------------------------------------------


def _ts_literal(day: dt.date) -> Column:
    from pyspark.sql import functions as F

    return F.lit(f"{day.isoformat()} 00:00:00").cast("timestamp")  # session time zone: UTC


def _arrow(df: DataFrame) -> pa.Table:
    return df.toArrow()


def _ids_array(values: pa.ChunkedArray | pa.Array) -> np.ndarray:
    if pa.types.is_integer(values.type):
        return np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.int64)
    return np.asarray(values.to_numpy(zero_copy_only=False), dtype=object)


def _extend(prev: np.ndarray | None, current: np.ndarray, what: str) -> np.ndarray:
    """Earlier ids keep their position; ids new this week are appended in sorted order."""
    if prev is None or len(prev) == 0:
        return np.sort(current)
    if (prev.dtype == object) != (current.dtype == object):
        raise DataError(f"{what} ids changed type since the previous snapshot ({prev.dtype} -> {current.dtype})",
                        "ingest the events with the same id type every week, or build into a fresh lake (--out)")
    new = np.setdiff1d(current, prev) if current.dtype != object else np.array(sorted(set(current) - set(prev)), dtype=object)
    return np.concatenate([prev, new])


def _id_arrow(values: np.ndarray) -> pa.Array:
    return pa.array(values.astype(np.int64)) if values.dtype != object else pa.array(values.astype(str))


def _previous(cfg: BuildMatrixJob) -> tuple[Location, dict[str, Any]] | None:
    """The latest snapshot under <out>/snapshots with an as-of before this one."""
    snaps = resolve(cfg.out).join(SNAPSHOTS)
    this = f"as_of={cfg.as_of.isoformat()}"
    for name in reversed(snaps.list()):
        if name.startswith("as_of=") and name < this and snaps.join(name, MANIFEST).exists():
            loc = snaps.join(name)
            try:
                manifest = json.loads(loc.join(MANIFEST).read_bytes())
            except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
                raise DataError(f"the previous snapshot's manifest {loc.join(MANIFEST).uri} is not valid JSON ({err})",
                                "restore that manifest, or move its snapshot folder out of the lake") from err
            if not isinstance(manifest, dict):
                raise DataError(f"the previous snapshot's manifest {loc.join(MANIFEST).uri} is not a JSON object",
                                "restore that manifest, or move its snapshot folder out of the lake")
            return loc, manifest
    return None


def _check_out(cfg: BuildMatrixJob) -> None:
    out = resolve(cfg.out)
    if out.is_file():
        raise DataError(f"--out {out.uri} is a file, not a lake folder",
                        "pass the lake's root folder (the snapshot goes to OUT/snapshots/as_of=DATE)")


def _build(cfg: BuildMatrixJob) -> str:
    from py4j.protocol import Py4JJavaError
    from pyspark.errors import PySparkException

    cfg.window_start, cfg.window_end  # noqa: B018 - a window that leaves the calendar fails before anything runs
    _check_out(cfg)
    where = f"events {cfg.events} as of {cfg.as_of} (window {cfg.window_start}..{cfg.as_of})"
    inputs = _list_inputs(cfg)
    if not inputs.files:
        dq.enforce(dq.check_events(dq.EventStats(events=0), cfg.dq), where)
    prev = _previous(cfg)

    with tempfile.TemporaryDirectory(prefix="recsys-events-") as tmp:
        paths = _stage(cfg, inputs, tmp)
        fields, spark_schema = _inspect_inputs(paths)  # before Spark: one line per bad file, not a JVM trace
        schema = dq.check_schema(fields)
        spark = spark_session(cfg.spark, "recsys-build-matrix", cfg.shuffle_partitions, cfg.driver_memory)
        try:
            return _build_spark(cfg, spark, paths, spark_schema, fields, schema, inputs, prev, where)
        except (PySparkException, Py4JJavaError) as err:
            if cfg.read_direct and any(m in str(err) for m in ("S3AFileSystem not found", "No FileSystem for scheme",
                                                                "UnsupportedFileSystem")):
                raise DataError(f"Spark on {cfg.spark.master} cannot read s3a:// (no hadoop-aws on its classpath) for "
                                f"{where}", "run on a cluster that has it (EMR), add hadoop-aws to spark.jars.packages, "
                                "or turn read_direct off (the driver stages the events)") from err
            wrapped = _spark_read_error(err, paths, where)
            if wrapped is None:
                raise
            raise wrapped from err


def _build_spark(cfg: BuildMatrixJob, spark: SparkSession, paths: dict[str, str], spark_schema: StructType,
                 fields: dict[str, str], schema: dq.CheckResult, inputs: _Inputs,
                 prev: tuple[Location, dict[str, Any]] | None, where: str) -> str:
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    raw = spark.read.schema(spark_schema).parquet(*paths)
    dq.enforce([schema], where)
    has_ts, has_w = "event_ts" in fields, "weight" in fields
    uid, iid = F.col("user_id"), F.col("item_id")
    if fields["user_id"] == "int":
        uid = uid.cast("long")
    if fields["item_id"] == "int":
        iid = iid.cast("long")
    ev = raw.select(uid.alias("user_id"), iid.alias("item_id"),
                    (F.col("weight").cast("double") if has_w else F.lit(1.0)).alias("weight"),
                    *([F.col("event_ts").cast("timestamp").alias("event_ts")] if has_ts else []))

    # One pass: the (user, item) aggregation also carries the counts the event gates need, so the raw
    # events are scanned and shuffled once (the pairs are far fewer than the events only with repeats).
    zero, one = F.lit(0), F.lit(1)
    bad_id = F.col("user_id").isNull() | F.col("item_id").isNull()
    neg = [F.col(c) < 0 for c in ("user_id", "item_id") if fields[c] == "int"]
    neg_id = (neg[0] | neg[1] if len(neg) == 2 else neg[0]) if neg else F.lit(False)
    start, end = _ts_literal(cfg.window_start), _ts_literal(cfg.window_end)
    ts = F.col("event_ts")
    in_window = ((ts >= start) & (ts < end)) | ts.isNull() if has_ts else F.lit(True)
    future = ts >= end if has_ts else F.lit(False)
    pairs = ev.groupBy("user_id", "item_id").agg(
        F.count(one).alias("rows"), F.sum(F.when(in_window, one).otherwise(zero)).alias("n"),
        F.sum(F.when(future, one).otherwise(zero)).alias("future"),
        F.max(F.when(in_window, F.col("weight"))).alias("w"),
    ).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        srow = pairs.agg(
            F.sum("rows").alias("rows"), F.sum("n").alias("in_window"), F.sum("future").alias("future"),
            F.sum(F.when(bad_id, F.col("rows")).otherwise(zero)).alias("null_ids"),
            F.sum(F.when(neg_id, F.col("rows")).otherwise(zero)).alias("negative_ids"),
            F.sum(F.when(F.col("n") > 0, one).otherwise(zero)).alias("pairs"),
        ).collect()[0]
        rows, in_win = int(srow["rows"] or 0), int(srow["in_window"] or 0)
        n_pairs = int(srow["pairs"] or 0)
        # A dt-partitioned lake promises its days: stray timestamps there are a gate. A flat file is a full
        # history: it is filtered to the window and the rows outside are only recorded.
        events = in_win if not inputs.partitioned else rows
        stats = dq.EventStats(events=events, null_ids=int(srow["null_ids"] or 0),
                              negative_ids=int(srow["negative_ids"] or 0), future_events=int(srow["future"] or 0),
                              out_of_window=(rows - in_win) if inputs.partitioned else 0, pairs=n_pairs)
        results = [schema, *dq.check_events(stats, cfg.dq)]
        dq.enforce(results, where)
        pairs_in = pairs.where(F.col("n") > 0)
        rule = {"any": F.lit(True), "ge": F.col("w") >= cfg.binarize.threshold,
                "gt": F.col("w") > cfg.binarize.threshold}[cfg.binarize.op]
        pos = pairs_in.where(rule).select("user_id", "item_id")
        if cfg.min_item_interactions > 1:
            keep_items = pos.groupBy("item_id").count().where(F.col("count") >= cfg.min_item_interactions)
            pos = pos.join(F.broadcast(keep_items.select("item_id")), "item_id", "left_semi")
        per_user = _arrow(pos.groupBy("user_id").agg(F.count(F.lit(1)).alias("n"))
                          .withColumn("h", F.xxhash64(F.lit(cfg.seed), "user_id")))
        snapshot = _assemble(cfg, spark, pos, per_user, prev, results, stats, n_pairs, inputs, rows, where)
    finally:
        pairs.unpersist()
    return snapshot


def _assemble(cfg: BuildMatrixJob, spark: SparkSession, pos: DataFrame, per_user: pa.Table,
              prev: tuple[Location, dict[str, Any]] | None, results: list[dq.CheckResult], stats: dq.EventStats,
              n_pairs: int, inputs: _Inputs, rows_read: int, where: str) -> str:
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    users = per_user.to_pandas()
    users = users[users["n"] >= cfg.min_user_interactions].sort_values(["h", "user_id"], kind="stable")
    n_kept = len(users)
    nv, nt = split_count("n_valid", cfg.n_valid, n_kept), split_count("n_test", cfg.n_test, n_kept)
    if n_kept - nv - nt < 1 or nv < 1 or nt < 1:
        raise DataError(f"{n_kept} user(s) with >= {cfg.min_user_interactions} positives cannot hold {nv} validation, "
                        f"{nt} test and at least one training user ({where})",
                        "use a longer --window-days, a lower --min-user-interactions, or smaller --n-valid/--n-test")
    roles = np.array(["train"] * n_kept, dtype=object)
    roles[:nv], roles[nv:nv + nt] = "valid", "test"
    kept_ids = _ids_array(pa.array(users["user_id"]))

    prev_users = prev_items = None
    if prev is not None:
        ploc, pman = prev
        prev_users = _ids_array(read_table(ploc, pman, "users", True).sort_by("user_idx")["user_id"])
        prev_items = _ids_array(read_table(ploc, pman, "items", True).sort_by("item_idx")["item_id"])
    all_users = _extend(prev_users, kept_ids, "user")
    user_pos = pd.Index(all_users).get_indexer(kept_ids)
    user_role = np.full(len(all_users), "inactive", dtype=object)
    user_role[user_pos] = roles
    kept = spark.createDataFrame(pa.table({"user_id": _id_arrow(kept_ids), "user_idx": pa.array(user_pos, pa.int64()),
                                           "role": pa.array(roles.astype(str))}))
    labeled = pos.join(F.broadcast(kept), "user_id")
    train_pairs = labeled.where(F.col("role") == "train")

    train_item_ids = _ids_array(_arrow(train_pairs.select("item_id").distinct())["item_id"])
    all_items = _extend(prev_items, train_item_ids, "item")
    item_pos = pd.Index(all_items).get_indexer(train_item_ids)
    items_df = F.broadcast(spark.createDataFrame(pa.table({"item_id": _id_arrow(train_item_ids),
                                                           "item_idx": pa.array(item_pos, pa.int64())})))

    train = train_pairs.join(items_df, "item_id").select("user_idx", "item_idx")
    w = Window.partitionBy("user_idx")
    n = F.count(F.lit(1)).over(w)
    rank = F.row_number().over(w.orderBy(F.xxhash64(F.lit(cfg.seed), "user_id", "item_id"), "item_idx")) - 1
    n_targets = F.floor(F.lit(cfg.target_fraction) * n)
    n_targets = F.when((n_targets == 0) & (n >= 2), 1).otherwise(n_targets)
    heldout = labeled.where(F.col("role") != "train").join(items_df, "item_id").select(
        "user_idx", "item_idx", "role", F.when(rank < n_targets, "target").otherwise("fold_in").alias("part"))

    dq_counts = {"events": stats.events, "users": n_kept, "items": len(train_item_ids)}
    results += dq.check_drops(dq_counts, prev[1].get("dq_counts") if prev else None, cfg.dq)
    dq.enforce(results, where)

    small = {
        "users": pa.table({"user_idx": pa.array(np.arange(len(all_users), dtype=np.int64)),
                           "user_id": _id_arrow(all_users), "role": pa.array(user_role.astype(str))}),
        "items": pa.table({"item_idx": pa.array(np.arange(len(all_items), dtype=np.int64)), "item_id": _id_arrow(all_items)}),
    }
    if cfg.items is not None:  # validated before anything is written: a bad items file publishes nothing
        small["item_metadata"] = item_metadata_table(read_items_uri(cfg.items), all_items, train_item_ids)
    # blocks of consecutive user_idx holding about part_rows positives each: a function of the data only
    n_blocks = max(1, -(-int(users["n"].sum()) // cfg.part_rows))
    users_per_block = max(1, -(-len(all_users) // n_blocks))
    root = resolve(cfg.snapshot_uri())
    root.check_writable()
    run_id = new_run_id()
    try:
        files = write_tables(root, run_id, small)
        env = executor_env(cfg.spark)
        tfiles, _ = _write_blocks(train, root, run_id, "train", users_per_block, n_blocks, env)
        hfiles, targets = _write_blocks(heldout, root, run_id, "heldout", users_per_block, n_blocks, env)
        files |= tfiles | hfiles
        for role in ("valid", "test"):
            if not targets.get(role):
                raise DataError(f"no {role} user has a target item after dropping items unseen in training ({where})",
                                "use more events (a longer --window-days) or more held-out users")
        n_train = sum(f["rows"] for f in tfiles.values())
        n_heldout = sum(f["rows"] for f in hfiles.values())
        counts = {"users": len(all_users), "items": len(all_items), "active_users": n_kept,
                  "inactive_users": len(all_users) - n_kept, "train_users": n_kept - nv - nt,
                  "train_interactions": n_train, "valid_users": nv, "test_users": nt,
                  "heldout_interactions": n_heldout, "events_read": rows_read, "events_in_window": stats.events,
                  "pairs": n_pairs, "new_users": len(all_users) - (len(prev_users) if prev_users is not None else 0),
                  "new_items": len(all_items) - (len(prev_items) if prev_items is not None else 0)}
        if "item_metadata" in small:
            meta = small["item_metadata"]
            counts |= {"items_with_metadata": meta.num_rows,
                       "cold_items": int(pc.sum(meta.column("cold")).as_py() or 0)}
        manifest = {
            "snapshot_id": f"as_of={cfg.as_of.isoformat()}", "as_of": cfg.as_of.isoformat(),
            "window": {"start": cfg.window_start.isoformat(), "end": cfg.as_of.isoformat(), "days": cfg.window_days,
                       "partitioned": inputs.partitioned},
            "counts": counts, "dq_counts": dq_counts, "dq": [r.as_dict() for r in results],
            # the Spark settings may hold secrets (spark.hadoop.fs.s3a.*): only the master is recorded
            "config": cfg.model_dump(mode="json", exclude={"spark"}),
            "binarize": cfg.binarize.describe(),
            "inputs": [{"path": i.path, "bytes": i.size} for i in inputs.files],
            "previous_snapshot": prev[0].uri if prev else None,
        }
        publish(root, run_id, files, manifest)
    except BaseException:
        discard(root, run_id)  # unless the manifest names it already
        raise
    logger.info("published %s: %s", root.uri, counts)
    return root.uri


def item_metadata_table(items: pa.Table, all_items: np.ndarray, train_item_ids: np.ndarray) -> pa.Table:
    """The snapshot's item_metadata: one row per item of the (validated) items table, with its snapshot column
    (item_idx, null for an item outside the matrix) and `cold` (no training click in this snapshot: a new title, or
    a column kept from an earlier week without clicks now), then the contract's columns."""
    ids = items.column("item_id").combine_chunks()
    want = pa.int64() if np.issubdtype(all_items.dtype, np.integer) else pa.string()
    if ids.type != want and not (pa.types.is_integer(ids.type) and want == pa.int64()):
        raise DataError(f"the items file has item ids of type {ids.type}, the events {want}",
                        "use the events' item ids in the items file (same catalog, same id type)")
    ids = ids.cast(want)
    idx = pd.Index(all_items).get_indexer(ids.to_numpy(zero_copy_only=False))
    warm = pd.Index(train_item_ids).get_indexer(ids.to_numpy(zero_copy_only=False)) >= 0
    cols = {"item_id": ids, "item_idx": pa.array(np.where(idx >= 0, idx, 0), pa.int64(), mask=idx < 0),
            "cold": pa.array(~warm)}
    return pa.table(cols | {c: items.column(c) for c in items.column_names if c != "item_id"})


_SCHEMAS = {"train": pa.schema([("user_idx", pa.int64()), ("item_idx", pa.int64())]),
            "heldout": pa.schema([("user_idx", pa.int64()), ("item_idx", pa.int64()), ("role", pa.string()),
                                  ("part", pa.string())])}
_WRITTEN = "name string, rows long, bytes long, sha256 string, valid_targets long, test_targets long"


def _block_writer(uri: str, schema: pa.Schema, users_per_block: int,
                  env: dict[str, str]) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """The executors' side of `_write_blocks`: every block in a task's rows, sorted, as one part file under `uri`."""

    def write(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        apply_env(env)
        got = [b for b in batches if b.num_rows]
        if not got:
            return
        rows = pa.Table.from_batches(got).select(schema.names).cast(schema)
        block = pc.divide(rows["user_idx"], users_per_block)  # integer division: user_idx >= 0
        out = resolve(uri)
        for b in sorted(set(block.to_pylist())):
            part = rows.filter(pc.equal(block, b)).sort_by([("user_idx", "ascending"), ("item_idx", "ascending")])
            data = table_bytes(part.combine_chunks())
            name = f"part-{b:05d}.parquet"
            out.join(name).write_bytes(data)
            hook("snapshot-part")  # a test seam (pipeline.io.publish.hook): inert unless RECSYS_HOOK_POINT names it
            targets = {r: 0 for r in ("valid", "test")}
            if "part" in schema.names:
                is_target = pc.equal(part["part"], "target")
                for r in targets:
                    targets[r] = int(pc.sum(pc.and_(is_target, pc.equal(part["role"], r))).as_py() or 0)
            yield pa.RecordBatch.from_pylist([{
                "name": name, "rows": part.num_rows, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                "valid_targets": targets["valid"], "test_targets": targets["test"]}])

    return write


def _write_blocks(df: DataFrame, root: Location, run_id: str, table: str, users_per_block: int, n_blocks: int,
                  env: dict[str, str]) -> tuple[dict[str, dict[str, Any]], dict[str, int]]:
    """Write `df` from the executors as <root>/<run_id>/<table>/part-<block>.parquet; returns (the manifest's file
    entries, target rows per held-out role). A table without rows gets one empty part (readers need one file)."""
    from pyspark.sql import functions as F

    uri = root.join(run_id, table).uri
    schema = _SCHEMAS[table]
    blocks = df.repartition(n_blocks, F.expr(f"user_idx div {int(users_per_block)}"))  # the writer's blocks
    written = blocks.mapInArrow(_block_writer(uri, schema, users_per_block, env), _WRITTEN).toArrow()
    files: dict[str, dict[str, Any]] = {}
    targets = {"valid": 0, "test": 0}
    for r in written.to_pylist():
        files[f"{run_id}/{table}/{r['name']}"] = {"rows": r["rows"], "bytes": r["bytes"], "sha256": r["sha256"]}
        targets["valid"] += r["valid_targets"]
        targets["test"] += r["test_targets"]
    if not files:
        files = write_tables(root, run_id, {table: schema.empty_table()})
    return files, targets
