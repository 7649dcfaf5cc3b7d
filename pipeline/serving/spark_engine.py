"""The Spark engine of batch inference: histories by groupBy, scoring by mapInArrow, one model per worker.

The driver saves the bundle once and broadcasts its bytes; each Python worker unpacks and loads it once
(cached in a module global, keyed by its digest) and scores its partitions with the same
`score_histories`/`to_table` as the local engine. Each task then checks its part against its users' histories
(`check_part`) and writes it straight into the run folder of the driver's PartitionWriter (pipeline.io.publish's
part format, through pipeline.io.lake: a local or shared path, or s3://), and returns only the part's manifest
entry. The driver records the entries and commits them (one Delta commit of the date), so readers see the same
atomic publish as with the local engine, and the scored rows never pass through the driver. A failed check comes back as an entry
with an error: the driver aborts the run (its folder, with every part already written, is removed).

The session comes from pipeline.io.spark (a SparkConfig: RECSYS_SPARK_* by default, see `SparkConfig.from_env`;
UTC session time zone); the day cut-offs on event_ts are built so that they do not depend on the Python
process's or the JVM's time zone either (`day_start`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import DataError
from pipeline.io import lake
from pipeline.io.ids import MAX_STRING_ID
from pipeline.io.publish import PartitionWriter, hook, write_part_file
from pipeline.io.spark import SparkConfig, apply_env, executor_env, spark_session
from pipeline.serving import checks
from pipeline.serving.availability import load_availability
from pipeline.serving.cold_items import ColdItems, cold_stats, extend_mask, extend_vocab
from pipeline.serving.events import bad_user_id, open_events
from pipeline.serving.exclusions import Exclusions, load_exclusions
from pipeline.serving.options import InferOptions
from pipeline.serving.scoring import score_histories, to_table
from pipeline.serving.sizing import batch_size_for, shard_events_for
from pipeline.serving.vocab import vocabulary

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession
    from pyspark.sql.types import DataType

    from pipeline.io.bundle import ModelBundle

APP_NAME = "recsys-infer"
DEFAULT_MASTER = "local[*]"  # RECSYS_SPARK_MASTER overrides it

_WORKER_BUNDLES: dict[str, Any] = {}  # digest → ModelBundle, one per Python worker process


def pack_bundle(bundle: ModelBundle) -> tuple[bytes, str]:
    """The bundle saved and tarred in memory: (bytes to broadcast, their sha256, the workers' cache key)."""
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

        from pipeline.io.bundle import ModelBundle

        torch.set_num_threads(int(os.environ.get("RECSYS_WORKER_THREADS", "1")))  # one task per core already
        d = tempfile.mkdtemp(prefix="recsys-bundle-")
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tar.extractall(d, filter="data")
        _WORKER_BUNDLES[digest] = ModelBundle.load(Path(d) / "bundle", "cpu")
        shutil.rmtree(d, ignore_errors=True)
    return _WORKER_BUNDLES[digest]


def get_spark(cfg: SparkConfig | None = None) -> SparkSession:
    """The session this engine runs on: pipeline.io.spark's, on `cfg` (default: RECSYS_SPARK_*, master local[*])."""
    return spark_session(cfg or SparkConfig.from_env(DEFAULT_MASTER), APP_NAME)


def day_start(day: dt.date, data_type: DataType) -> Column:
    """00:00 UTC of `day` as a literal comparable with an event_ts column of `data_type` (a timestamp: `open_events`
    refused the other types, as the local engine does).

    TIMESTAMP (an instant; Parquet's tz-aware timestamps): a tz-aware UTC datetime, which PySpark turns into
    that instant. A naive datetime would be read in the Python process's local zone, moving the cut-off by
    hours under TZ=America/New_York. TIMESTAMP_NTZ (wall-clock; how Spark reads Parquet's naive timestamps):
    the wall-clock string cast as such, with no zone involved; the local engine takes naive values as UTC too."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import TimestampNTZType, TimestampType

    if isinstance(data_type, TimestampNTZType):
        return F.lit(f"{day.isoformat()} 00:00:00").cast("timestamp_ntz")
    if isinstance(data_type, TimestampType):
        return F.lit(dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC))
    raise DataError(f"events column event_ts has type {data_type.simpleString()}, not a timestamp",
                    "store event_ts as a Parquet timestamp (UTC), or drop it and partition by dt=")


def histories(spark: SparkSession, opts: InferOptions, vocab: pa.Array) -> tuple[DataFrame, DataFrame]:
    """(events joined to model columns, per-user sorted unique known columns), with the local engine's rules
    (pipeline.serving.events.events_filter): up to and including opts.date, inside the history window."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import NumericType

    first = opts.first_day
    open_events(opts.events)  # the local engine's checks of the files (columns, id types, every file's event_ts)
    loc = lake.resolve(opts.events)
    path = loc.path if loc.uri == loc.path else loc.uri  # local path, or the cluster's s3:// (EMR)
    reader = spark.read if loc.is_file() else spark.read.option("basePath", path)
    ev = reader.parquet(path)
    missing = {"user_id", "item_id"} - set(ev.columns)
    if missing:
        raise DataError(f"events at {loc.uri} lack column(s) {sorted(missing)}", "events need user_id and item_id")
    ev = ev.where(F.col("user_id").isNotNull() & F.col("item_id").isNotNull())
    if "dt" in ev.columns:
        day = F.col("dt").cast("string")  # Spark infers dt= folders as dates: their string form is ISO
        ev = ev.where(day <= opts.date.isoformat())
        if first is not None:
            ev = ev.where(day >= first.isoformat())
    if "event_ts" in ev.columns:
        ts_type = ev.schema["event_ts"].dataType
        if opts.day_after is not None:  # 9999-12-31 has no day after: every event is up to it
            ev = ev.where(F.col("event_ts") < day_start(opts.day_after, ts_type))
        if first is not None:
            ev = ev.where(F.col("event_ts") >= day_start(first, ts_type))
    if opts.min_weight is not None:  # as the local engine: never publish silently unfiltered recommendations
        w = ev.schema["weight"].dataType if "weight" in ev.columns else None
        if not isinstance(w, NumericType):
            raise DataError(f"--min-weight needs a numeric weight column; the events have "
                            f"{'none' if w is None else f'one of type {w.simpleString()}'}",
                            "drop --min-weight, or pass events with a numeric weight column")
        ev = ev.where(F.col("weight") >= opts.min_weight)
    is_int = pa.types.is_integer(vocab.type)
    vocab_df = spark.createDataFrame(
        pa.table({"item_key": vocab, "col": pa.array(np.arange(len(vocab), dtype=np.int32))}).to_pandas())
    ev = ev.select(F.col("user_id"), F.col("item_id").cast("long" if is_int else "string").alias("item_key"),
                   F.col("item_id"))
    joined = ev.join(F.broadcast(vocab_df), "item_key", "left")
    hist = joined.groupBy("user_id").agg(F.sort_array(F.collect_set("col")).alias("cols"))
    return joined, hist


_WRITTEN = ("error string, path string, rows long, bytes long, sha256 string, fallback long, index string, "
            "backfilled long, short long, cold_users long, cold_shown string, excluded_users long")


def with_exclusions(spark: SparkSession, hist: DataFrame, exclusions: Exclusions) -> DataFrame:
    """`hist` (user_id, cols) with a third column, blocked: each user's sorted excluded columns (null: none).

    A join rather than a broadcast of the whole list: each task then holds only its own users' exclusions
    (the CSR a shard of the local engine gets from Exclusions.for_users) instead of every executor holding,
    and searching per batch, the full (user, column) list. Spark still broadcasts the small side of the join
    when it is under spark.sql.autoBroadcastJoinThreshold, which is the cheap case anyway."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    string_users = isinstance(hist.schema["user_id"].dataType, T.StringType)
    # converted in Arrow, as for_users matches ids (a cast Spark would do under ANSI mode could fail the job)
    pairs = exclusions.as_table(pa.string() if string_users else pa.int64())
    ex = spark.createDataFrame(pairs.to_pandas(), f"user_id {'string' if string_users else 'long'}, col int")
    blocked = ex.groupBy("user_id").agg(F.sort_array(F.collect_set("col")).alias("blocked"))
    return hist.join(blocked, "user_id", "left").select("user_id", "cols", "blocked")


def run_spark(opts: InferOptions, bundle: ModelBundle, model_version: str, writer: PartitionWriter,
              spark_config: SparkConfig | None = None, cold: ColdItems | None = None) -> dict[str, Any]:
    """Score every active user on Spark; the executors write the checked parts into `writer`'s run folder (not
    committed); returns the manifest's stats. Parts cover disjoint user ranges, sorted within. On any error the
    run's folder is removed (`writer.abort()`). `cold` (pipeline.serving.cold_items): the day's new items, shipped
    in the closure ([n_items, new] float32) and merged by each task as the local engine does; each task returns
    the new items it showed and the driver counts the distinct ones. Exclusions are resolved against the model's
    plus the new items, so the joined `blocked` lists carry a user's excluded new items (columns n_items + j) to
    the merge and the checks."""
    from pyspark import TaskContext
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    spark = get_spark(spark_config)
    vocab = vocabulary(bundle)
    bs = batch_size_for(bundle.n_items, opts.top_n, opts.memory_budget_mb, max_batch=opts.max_batch)
    availability = None if opts.availability is None else load_availability(opts.availability, opts.date, vocab)
    mask = None if availability is None else availability.mask  # shipped in the closure: n_items bytes
    out_mask = extend_mask(mask, cold)
    # over the extended vocabulary: an excluded new item is a blocked column n_items + j, joined to its user below
    exclusions = None if opts.exclusions is None else load_exclusions(opts.exclusions, opts.date,
                                                                      extend_vocab(vocab, cold))
    joined, hist = histories(spark, opts, vocab)
    if exclusions is not None and len(exclusions.cols):
        hist = with_exclusions(spark, hist, exclusions)  # only the task's users' rows reach each task
    user = F.col("user_id")
    # the id rule of pipeline.io.ids, as the local engine applies it (events.check_user_ids); Java regex, code points
    bad_user = ((F.length(user) == 0) | (F.length(user) > MAX_STRING_ID) | user.rlike("[\\x00-\\x1F\\x7F-\\x9F]")
                if isinstance(joined.schema["user_id"].dataType, T.StringType) else F.lit(False))
    counts = joined.agg(F.count(F.lit(1)).alias("events"), F.sum(F.col("col").isNull().cast("long")).alias("unknown"),
                        F.countDistinct(F.when(F.col("col").isNull(), F.col("item_id"))).alias("unknown_items"),
                        F.countDistinct("user_id").alias("users"), F.sum(bad_user.cast("long")).alias("bad_users")
                        ).collect()[0]
    if not counts["events"]:
        raise DataError(f"no events up to {opts.date} in {opts.events}", "check --events and --date (and --history-days)")
    if counts["bad_users"]:
        example = joined.where(bad_user).select("user_id").first()
        raise bad_user_id(example[0] if example is not None else "", opts.events)
    checks.check_shares(opts, int(counts["events"]), int(counts["unknown"] or 0))  # before any scoring
    n_parts = max(1, -(-int(counts["events"]) // (opts.shard_events or shard_events_for(opts.memory_budget_mb))))
    data, digest = pack_bundle(bundle)
    shipped = spark.sparkContext.broadcast(data)
    top_n = opts.top_n
    precision = opts.precision
    has_exclusions = exclusions is not None  # every task passes blocked (maybe empty) to the checks and scoring
    restricted = "availability" if availability is not None else "exclusions"  # whose backfill counts (scoring)
    run_uri = writer.run_dir.uri
    env = executor_env(spark.sparkContext.master or "")

    def score(rb: pa.RecordBatch, b: ModelBundle, voc: pa.Array, counts: dict[str, int]
              ) -> tuple[pa.Table, np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
        cols = rb.column(1)
        flat = cols.flatten().to_numpy(zero_copy_only=False).astype(np.int32)
        offs = cols.offsets.to_numpy()
        indptr = (offs - offs[0]).astype(np.int64)
        blocked = None
        if rb.num_columns > 2:  # with_exclusions' column; a null list: the user excluded nothing
            lists = rb.column(2)
            lengths = pc.list_value_length(lists).fill_null(0).to_numpy(zero_copy_only=False)
            blocked = (np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                       lists.flatten().to_numpy(zero_copy_only=False).astype(np.int64))
        elif has_exclusions:
            blocked = (np.zeros(rb.num_rows + 1, np.int64), np.zeros(0, np.int64))
        top, sc, fb = score_histories(b, indptr, flat, top_n, bs, precision=precision, available=mask, counts=counts,
                                      cold=cold, blocked=blocked)
        return to_table(rb.column(0), top, sc, fb, voc, model_version), indptr, flat, blocked

    def score_and_write(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        """One task: its users' lists, checked, as one part file in the run folder; yields the part's entry."""
        apply_env(env)
        b = worker_bundle(shipped.value, digest)
        voc = extend_vocab(vocabulary(b), cold)
        tables, indptrs, flats, blocks = [], [], [], []
        counts: dict[str, int] = {}
        for rb in batches:
            if rb.num_rows:
                t, indptr, flat, blocked = score(rb, b, voc, counts)
                tables.append(t)
                indptrs.append(indptr)
                flats.append(flat)
                blocks.append(blocked)
        if not tables:
            return
        t = pa.concat_tables(tables).combine_chunks()
        lengths = np.concatenate([np.diff(p) for p in indptrs])
        indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        cols = np.concatenate(flats).astype(np.int64)
        blocked = None
        if has_exclusions:  # the part's rows' exclusions, for its check
            b_lengths = np.concatenate([np.diff(p[0]) for p in blocks if p is not None])
            blocked = (np.concatenate([[0], np.cumsum(b_lengths)]).astype(np.int64),
                       np.concatenate([p[1] for p in blocks if p is not None]).astype(np.int64))
        users = t.column("user_id").combine_chunks()
        t = checks.finalize_part(t)
        row: dict[str, Any] = {"error": None, "path": None, "rows": 0, "bytes": 0, "sha256": None, "fallback": 0,
                               "index": None, "backfilled": counts.get(f"{restricted}_backfilled_users", 0),
                               "short": counts.get(f"{restricted}_short_users", 0),
                               "excluded_users": counts.get("exclusions_users", 0),
                               "cold_users": counts.get("cold_users", 0),  # (cold_merge_us: local engine only)
                               "cold_shown": json.dumps([] if cold is None else np.flatnonzero(cold.shown).tolist())}
        try:
            checks.check_part(t, users, indptr, cols, voc, top_n, model_version, out_mask, blocked)
        except DataError as e:  # the driver raises it (no retries of a deterministic failure)
            row["error"] = json.dumps([type(e).__name__, e.problem, e.fix])
            yield pa.RecordBatch.from_pylist([row], schema=_written_schema())
            return
        name = f"part-{TaskContext.get().partitionId():05d}.parquet"  # type: ignore[union-attr]
        entry = write_part_file(lake.resolve(run_uri).join(name), t)
        row |= {"path": entry["path"], "rows": entry["rows"], "bytes": entry["bytes"], "sha256": entry["sha256"],
                "fallback": int(np.sum(t.column("fallback").to_numpy())),
                "index": json.dumps(checks.user_range(users))}
        yield pa.RecordBatch.from_pylist([row], schema=_written_schema())

    try:
        # Ranges of users (not hash buckets), sorted within: each published part then covers a disjoint user
        # range, and a reader looking up one user opens one part (and one row group of it).
        written = (hist.repartitionByRange(n_parts, "user_id").sortWithinPartitions("user_id")
                   .mapInArrow(score_and_write, _WRITTEN).toArrow())
        hook("spilled")
        rows = fallback = backfilled = short = cold_users = excluded_users = 0
        shown: set[int] = set()
        for r in sorted(written.to_pylist(), key=lambda r: r["path"] or ""):
            if r["error"] is not None:
                kind, problem, fix = json.loads(r["error"])
                if kind == checks.OutputCheckError.__name__:
                    raise checks.OutputCheckError(problem.removeprefix("output check failed: "), fix)
                raise DataError(problem, fix)
            writer.record_part({"path": r["path"], "rows": r["rows"], "bytes": r["bytes"], "sha256": r["sha256"],
                                **json.loads(r["index"])})
            rows += r["rows"]
            fallback += r["fallback"]
            backfilled += r["backfilled"]
            short += r["short"]
            cold_users += r["cold_users"] or 0
            excluded_users += r["excluded_users"] or 0
            shown.update(json.loads(r["cold_shown"] or "[]"))
        if rows != counts["users"]:
            raise checks.OutputCheckError(f"{rows} rows for {counts['users']} active users (one row per active user)")
    except BaseException:
        writer.abort()
        raise
    finally:
        shipped.unpersist()
    stats = {"batch_size": bs, "events": int(counts["events"]), "unknown_item_events": int(counts["unknown"] or 0),
             "unknown_items": int(counts["unknown_items"]), "shards": n_parts, "active_users": rows,
             "fallback_users": fallback}
    if availability is not None:
        stats |= availability.stats() | {"availability_backfilled_users": backfilled, "availability_short_users": short}
    if exclusions is not None:  # with availability, its counts include the exclusions' backfills (as local)
        stats |= exclusions.stats() | {"exclusions_users": excluded_users}
        if availability is None:
            stats |= {"exclusions_backfilled_users": backfilled, "exclusions_short_users": short}
    if cold is not None:
        cold.shown[sorted(shown)] = True
        stats |= cold_stats(cold, cold_users)
    return stats


def _written_schema() -> pa.Schema:
    return pa.schema([("error", pa.string()), ("path", pa.string()), ("rows", pa.int64()), ("bytes", pa.int64()),
                      ("sha256", pa.string()), ("fallback", pa.int64()), ("index", pa.string()),
                      ("backfilled", pa.int64()), ("short", pa.int64()), ("cold_users", pa.int64()),
                      ("cold_shown", pa.string()), ("excluded_users", pa.int64())])
