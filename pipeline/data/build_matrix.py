"""The weekly data build: events in a window -> one matrix snapshot (pipeline/io/snapshot.py's format).

``BuildMatrixJob(...).run()`` does, on Spark:

1. List the event partitions ``dt=YYYY-MM-DD`` of the window [as_of - window_days + 1, as_of] (a lake
   without ``dt=`` folders is read whole; its timestamps, when present, are filtered to the window). Events
   on S3 are staged to a local temp folder first (Spark has no s3a jars here; on EMR it would read directly).
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
7. The volume gates (against the previous manifest), then the tables (sorted, so same input + seed gives
   byte-identical files) are written under a new run folder and published by snapshot.write_run (manifest
   last; the run it replaced is kept for readers still on it, older runs are removed).

The final (user_idx, item_idx) tables are collected to the driver as Arrow: the trainer loads exactly these
rows into one process anyway (load_snapshot), so the driver holding them once is within the same bound, and
it buys byte-identical, hash-named files through the one writer of the format.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
from pydantic import BaseModel, ConfigDict, Field

from model.split import heldout_count as split_count
from pipeline.data import dq
from pipeline.data.dq import DQConfig
from pipeline.errors import DataError
from pipeline.io.lake import Location, resolve
from pipeline.io.snapshot import MANIFEST, manifest_digest, read_manifest, read_table, write_run
from pipeline.io.spark import spark_session
from pipeline.job import Job, JobResult

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

logger = logging.getLogger(__name__)

SNAPSHOTS = "snapshots"


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
    digest: str
    counts: dict[str, int]


class BuildMatrixJob(Job):
    """One weekly build: events in the window → a matrix snapshot under OUT/snapshots/as_of=DATE."""

    events: str  # events root (dt=YYYY-MM-DD partitions, or Parquet without them): local path or s3://
    as_of: dt.date
    out: str  # lake root; the snapshot goes to <out>/snapshots/as_of=YYYY-MM-DD
    window_days: int = Field(28, ge=1)
    spark_master: str = "local[*]"
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

    @property
    def window_start(self) -> dt.date:
        """The first day of the window (AS_OF - window_days + 1)."""
        return self.as_of - dt.timedelta(days=self.window_days - 1)

    def snapshot_uri(self) -> str:
        """Where this build publishes: OUT/snapshots/as_of=DATE."""
        return resolve(self.out).join(SNAPSHOTS, f"as_of={self.as_of.isoformat()}").uri

    def run(self) -> BuildResult:
        """Build, gate and publish the snapshot; a failed gate or bad input raises DataError and publishes nothing."""
        uri = _build(self)
        manifest = read_manifest(uri)
        return BuildResult(snapshot_uri=uri, digest=manifest_digest(manifest),
                           counts={k: int(v) for k, v in manifest.get("counts", {}).items() if isinstance(v, int)})


@dataclass(frozen=True)
class _Inputs:
    files: list[pafs.FileInfo]
    partitioned: bool


# --------------------------------------------------------------------------------------------------
# Input listing and staging
# --------------------------------------------------------------------------------------------------


def _parquet_files(loc: Location) -> list[pafs.FileInfo]:
    infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True))
    return sorted((i for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".parquet")),
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


def _stage(cfg: BuildMatrixJob, inputs: _Inputs, tmp: str) -> list[str]:
    """Local paths Spark can read: the files themselves, or copies of S3 objects under tmp."""
    root = resolve(cfg.events)
    if isinstance(root.fs, pafs.LocalFileSystem):
        return [i.path for i in inputs.files]
    paths = []
    for k, info in enumerate(inputs.files):
        local = os.path.join(tmp, f"{k:06d}-{info.base_name}")
        pafs.copy_files(info.path, local, source_filesystem=root.fs, destination_filesystem=pafs.LocalFileSystem())
        paths.append(local)
    return paths


# --------------------------------------------------------------------------------------------------
# Spark
# --------------------------------------------------------------------------------------------------


def _kind(data_type: Any) -> str:
    from pyspark.sql import types as T

    if isinstance(data_type, T.ByteType | T.ShortType | T.IntegerType | T.LongType):
        return "int"
    if isinstance(data_type, T.StringType):
        return "string"
    if isinstance(data_type, T.FloatType | T.DoubleType | T.DecimalType):
        return "float"
    if isinstance(data_type, T.TimestampType | T.TimestampNTZType):
        return "timestamp"
    return str(data_type.simpleString())


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
            return loc, loc.join(MANIFEST).read_json()
    return None


def _build(cfg: BuildMatrixJob) -> str:
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    where = f"events {cfg.events} as of {cfg.as_of} (window {cfg.window_start}..{cfg.as_of})"
    inputs = _list_inputs(cfg)
    if not inputs.files:
        dq.enforce(dq.check_events(dq.EventStats(events=0), cfg.dq), where)
    prev = _previous(cfg)
    spark = spark_session(cfg.spark_master, "recsys-build-matrix", cfg.shuffle_partitions, cfg.driver_memory)

    with tempfile.TemporaryDirectory(prefix="recsys-events-") as tmp:
        raw = spark.read.parquet(*_stage(cfg, inputs, tmp))
        fields = {f.name: _kind(f.dataType) for f in raw.schema.fields}
        schema = dq.check_schema(fields)
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
        start, end = _ts_literal(cfg.window_start), _ts_literal(cfg.as_of + dt.timedelta(days=1))
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

    train = _arrow(train_pairs.join(items_df, "item_id").select("user_idx", "item_idx")).sort_by(
        [("user_idx", "ascending"), ("item_idx", "ascending")])
    w = Window.partitionBy("user_idx")
    n = F.count(F.lit(1)).over(w)
    rank = F.row_number().over(w.orderBy(F.xxhash64(F.lit(cfg.seed), "user_id", "item_id"), "item_idx")) - 1
    n_targets = F.floor(F.lit(cfg.target_fraction) * n)
    n_targets = F.when((n_targets == 0) & (n >= 2), 1).otherwise(n_targets)
    heldout = _arrow(labeled.where(F.col("role") != "train").join(items_df, "item_id").select(
        "user_idx", "item_idx", "role", F.when(rank < n_targets, "target").otherwise("fold_in").alias("part"))
    ).sort_by([("user_idx", "ascending"), ("item_idx", "ascending")])
    heldout = heldout.cast(pa.schema([("user_idx", pa.int64()), ("item_idx", pa.int64()), ("role", pa.string()),
                                      ("part", pa.string())]))
    train = train.cast(pa.schema([("user_idx", pa.int64()), ("item_idx", pa.int64())]))
    targets = pc.equal(heldout["part"], "target")
    for role in ("valid", "test"):
        if not pc.any(pc.and_(targets, pc.equal(heldout["role"], role))).as_py():
            raise DataError(f"no {role} user has a target item after dropping items unseen in training ({where})",
                            "use more events (a longer --window-days) or more held-out users")

    dq_counts = {"events": stats.events, "users": n_kept, "items": len(train_item_ids)}
    results += dq.check_drops(dq_counts, prev[1].get("dq_counts") if prev else None, cfg.dq)
    dq.enforce(results, where)

    tables = {
        "users": pa.table({"user_idx": pa.array(np.arange(len(all_users), dtype=np.int64)),
                           "user_id": _id_arrow(all_users), "role": pa.array(user_role.astype(str))}),
        "items": pa.table({"item_idx": pa.array(np.arange(len(all_items), dtype=np.int64)), "item_id": _id_arrow(all_items)}),
        "train": train, "heldout": heldout,
    }
    counts = {"users": len(all_users), "items": len(all_items), "active_users": n_kept,
              "inactive_users": len(all_users) - n_kept, "train_users": n_kept - nv - nt,
              "train_interactions": train.num_rows, "valid_users": nv, "test_users": nt,
              "heldout_interactions": heldout.num_rows, "events_read": rows_read, "events_in_window": stats.events,
              "pairs": n_pairs, "new_users": len(all_users) - (len(prev_users) if prev_users is not None else 0),
              "new_items": len(all_items) - (len(prev_items) if prev_items is not None else 0)}
    root = resolve(cfg.snapshot_uri())
    manifest = {
        "snapshot_id": f"as_of={cfg.as_of.isoformat()}", "as_of": cfg.as_of.isoformat(),
        "window": {"start": cfg.window_start.isoformat(), "end": cfg.as_of.isoformat(), "days": cfg.window_days,
                   "partitioned": inputs.partitioned},
        "counts": counts, "dq_counts": dq_counts, "dq": [r.as_dict() for r in results],
        "config": cfg.model_dump(mode="json"), "binarize": cfg.binarize.describe(),
        "inputs": [{"path": i.path, "bytes": i.size} for i in inputs.files],
        "previous_snapshot": prev[0].uri if prev else None,
    }
    write_run(root, tables, manifest)  # removes the new run only if it never got published
    logger.info("published %s: %s", root.uri, counts)
    return root.uri
