"""The Spark engine of batch inference: histories by groupBy, scoring by mapInArrow, one model per worker.

The driver saves the bundle once and broadcasts its bytes; each Python worker unpacks and loads it once
(cached in a module global, keyed by its digest) and scores its partitions with the same
`score_histories`/`to_table` as the local engine. Spark writes the scored rows (with each user's history
columns, for the checks) as local Parquet; the driver then checks each file with `check_part` and
publishes it through pipeline.publish/lake (Spark cannot write s3:// here; on EMR it could).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import os
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import lake
from pipeline.errors import DataError
from pipeline.infer import (
    InferConfig,
    batch_size_for,
    check_part,
    finalize_part,
    score_histories,
    shard_events_for,
    to_table,
    user_range,
    vocabulary,
)
from pipeline.publish import PartitionWriter, hook

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from pipeline.bundle import ModelBundle

_WORKER_BUNDLES: dict[str, Any] = {}  # digest → ModelBundle, one per Python worker process


def pack_bundle(bundle: ModelBundle) -> tuple[bytes, str]:
    with tempfile.TemporaryDirectory() as d:
        bundle.save(Path(d) / "bundle")
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            tar.add(Path(d) / "bundle", arcname="bundle")
    data = buf.getvalue()
    return data, hashlib.sha256(data).hexdigest()


def worker_bundle(data: bytes, digest: str) -> ModelBundle:
    """The bundle in this worker: loaded from the broadcast bytes on first use, then reused."""
    if digest not in _WORKER_BUNDLES:
        import torch

        from pipeline.bundle import ModelBundle

        torch.set_num_threads(int(os.environ.get("RECSYS_WORKER_THREADS", "1")))  # one task per core already
        d = tempfile.mkdtemp(prefix="recsys-bundle-")
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tar.extractall(d, filter="data")
        _WORKER_BUNDLES[digest] = ModelBundle.load(Path(d) / "bundle", "cpu")
        shutil.rmtree(d, ignore_errors=True)
    return _WORKER_BUNDLES[digest]


def get_spark() -> SparkSession:
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    return (SparkSession.builder.master(os.environ.get("RECSYS_SPARK_MASTER", "local[*]")).appName("recsys-infer")
            .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
            .config("spark.ui.enabled", "false").getOrCreate())


def histories(spark: SparkSession, cfg: InferConfig, vocab: pa.Array) -> tuple[DataFrame, DataFrame]:
    """(events joined to model columns, per-user sorted unique known columns)."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import NumericType

    loc = lake.resolve(cfg.events)
    if not loc.exists():
        raise DataError(f"no events at {loc.uri}", "pass --events pointing at a Parquet file or a dt= partitioned folder")
    path = loc.path if loc.uri == loc.path else loc.uri  # local path, or the cluster's s3:// (EMR)
    reader = spark.read if loc.is_file() else spark.read.option("basePath", path)
    ev = reader.parquet(path)
    missing = {"user_id", "item_id"} - set(ev.columns)
    if missing:
        raise DataError(f"events at {loc.uri} lack column(s) {sorted(missing)}", "events need user_id and item_id")
    first = cfg.date - dt.timedelta(days=cfg.history_days - 1) if cfg.history_days else None
    ev = ev.where(F.col("user_id").isNotNull() & F.col("item_id").isNotNull())
    if "dt" in ev.columns:
        day = F.col("dt").cast("string")  # Spark infers dt= folders as dates: their string form is ISO
        ev = ev.where(day <= cfg.date.isoformat())
        if first is not None:
            ev = ev.where(day >= first.isoformat())
    if "event_ts" in ev.columns:
        end = dt.datetime.combine(cfg.date + dt.timedelta(days=1), dt.time())
        ev = ev.where(F.col("event_ts") < F.lit(end))
        if first is not None:
            ev = ev.where(F.col("event_ts") >= F.lit(dt.datetime.combine(first, dt.time())))
    if cfg.min_weight is not None:  # as the local engine: never publish silently unfiltered recommendations
        w = ev.schema["weight"].dataType if "weight" in ev.columns else None
        if not isinstance(w, NumericType):
            raise DataError(f"--min-weight needs a numeric weight column; the events have "
                            f"{'none' if w is None else f'one of type {w.simpleString()}'}",
                            "drop --min-weight, or pass events with a numeric weight column")
        ev = ev.where(F.col("weight") >= cfg.min_weight)
    is_int = pa.types.is_integer(vocab.type)
    vocab_df = spark.createDataFrame(
        pa.table({"item_key": vocab, "col": pa.array(np.arange(len(vocab), dtype=np.int32))}).to_pandas())
    ev = ev.select(F.col("user_id"), F.col("item_id").cast("long" if is_int else "string").alias("item_key"),
                   F.col("item_id"))
    joined = ev.join(F.broadcast(vocab_df), "item_key", "left")
    hist = joined.groupBy("user_id").agg(F.sort_array(F.collect_set("col")).alias("cols"))
    return joined, hist


def run_spark(cfg: InferConfig, bundle: ModelBundle, model_version: str, writer: PartitionWriter) -> dict[str, Any]:
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    spark = get_spark()
    vocab = vocabulary(bundle)
    bs = batch_size_for(bundle.n_items, cfg.top_n, cfg.memory_budget_mb, max_batch=cfg.max_batch)
    joined, hist = histories(spark, cfg, vocab)
    counts = joined.agg(F.count(F.lit(1)).alias("events"), F.sum(F.col("col").isNull().cast("long")).alias("unknown"),
                        F.countDistinct(F.when(F.col("col").isNull(), F.col("item_id"))).alias("unknown_items"),
                        F.countDistinct("user_id").alias("users")).collect()[0]
    if not counts["events"]:
        raise DataError(f"no events up to {cfg.date} in {cfg.events}", "check --events and --date (and --history-days)")
    n_parts = max(1, -(-int(counts["events"]) // (cfg.shard_events or shard_events_for(cfg.memory_budget_mb))))
    data, digest = pack_bundle(bundle)
    shipped = spark.sparkContext.broadcast(data)
    top_n = cfg.top_n
    precision = cfg.precision
    user_type = hist.schema["user_id"].dataType
    item_type = T.LongType() if pa.types.is_integer(vocab.type) else T.StringType()
    schema = T.StructType([T.StructField("user_id", user_type), T.StructField("item_ids", T.ArrayType(item_type)),
                           T.StructField("scores", T.ArrayType(T.FloatType())), T.StructField("model_version", T.StringType()),
                           T.StructField("fallback", T.BooleanType()), T.StructField("seen", T.ArrayType(T.IntegerType()))])

    def score(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        b = worker_bundle(shipped.value, digest)
        voc = vocabulary(b)
        for rb in batches:
            if rb.num_rows == 0:
                continue
            cols = rb.column(1)
            flat = cols.flatten().to_numpy(zero_copy_only=False).astype(np.int32)
            offs = cols.offsets.to_numpy()
            indptr = (offs - offs[0]).astype(np.int64)
            top, sc, fb = score_histories(b, indptr, flat, top_n, bs, precision=precision)
            t = to_table(rb.column(0), top, sc, fb, voc, model_version)
            seen = pa.ListArray.from_arrays(pa.array(indptr.astype(np.int32)), pa.array(flat, pa.int32()))
            yield from t.append_column("seen", seen).to_batches()

    tmp = Path(tempfile.mkdtemp(prefix="recsys-infer-spark-"))
    try:
        # Ranges of users (not hash buckets), sorted within: each published part then covers a disjoint user
        # range, and a reader looking up one user opens one part (and one row group of it).
        (hist.repartitionByRange(n_parts, "user_id").sortWithinPartitions("user_id")
         .mapInArrow(score, schema).write.parquet(str(tmp / "scored")))
        hook("spilled")
        rows = fallback = 0
        for f in sorted((tmp / "scored").glob("part-*.parquet")):
            t = pq.read_table(f)
            if t.num_rows == 0:
                continue
            seen = t.column("seen").combine_chunks()
            offs = seen.offsets.to_numpy()
            indptr = (offs - offs[0]).astype(np.int64)
            cols = seen.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
            t = t.drop_columns(["seen"])
            users = t.column("user_id").combine_chunks()
            t = finalize_part(t)
            check_part(t, users, indptr, cols, vocab, cfg.top_n, model_version)
            writer.write_part(t, **user_range(users))
            rows += t.num_rows
            fallback += int(np.sum(t.column("fallback").to_numpy()))
        if rows != counts["users"]:
            from pipeline.infer import OutputCheckError

            raise OutputCheckError(f"{rows} rows for {counts['users']} active users (one row per active user)")
    except BaseException:
        writer.abort()
        raise
    finally:
        shipped.unpersist()
        shutil.rmtree(tmp, ignore_errors=True)
    return {"batch_size": bs, "events": int(counts["events"]), "unknown_item_events": int(counts["unknown"] or 0),
            "unknown_items": int(counts["unknown_items"]), "shards": n_parts, "active_users": rows,
            "fallback_users": fallback}
