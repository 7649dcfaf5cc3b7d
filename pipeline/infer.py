"""Daily batch inference: every active user's top-N from the champion model, published atomically.

    events (Parquet, dt= partitions or one file) ──scan once──▶ local spill shards (users hashed)
        ──per shard──▶ histories (CSR over the model's columns) ──batches──▶ scores, seen masked, top N
        ──▶ checks ──▶ part file ──(all shards)──▶ _manifest.json ──▶ _SUCCESS (pipeline.publish)

Memory does not grow with the number of users: the events are read once as a stream and split into shard
files on the local disk by a hash of the user id; each shard (a bounded number of events) is then scored,
checked and written. Those steps overlap across shards (histories of the next shards and the checks and
Parquet of the previous ones run in worker threads while one is scored; `parallel_shards` bounds how many,
1 on small machines, so memory is bounded by the shard size, not the user count). The score matrix
of one batch is [batch, n_items] float32; the batch size is computed from the memory budget (`batch_size_for`).

Two engines share `score_histories` and `check_part`: "local" (this process) and "spark" (mapInArrow, one
model copy per Python worker; pipeline.infer_spark).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import resource
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from pydantic import BaseModel, ConfigDict, Field

from pipeline import lake
from pipeline.errors import DataError
from pipeline.publish import PartitionWriter, hook
from pipeline.sharding import scheme_for, shard_of

if TYPE_CHECKING:
    from pipeline.bundle import ModelBundle

log = logging.getLogger(__name__)

DEFAULT_MODEL = "models:/multivae-pia@champion"
OUTPUT_SCHEMA_FIELDS = ("user_id", "item_ids", "scores", "model_version", "fallback")


class InferConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    date: dt.date
    events: str
    out: str
    model: str = DEFAULT_MODEL
    top_n: int = Field(100, ge=1, le=10_000)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "tf32", "bf16"] = Field(
        "auto", description="scoring matmuls: auto = tf32 on CUDA, fp32 on the CPU (see scoring_precision)")
    engine: Literal["local", "spark"] = "local"
    memory_budget_mb: int = Field(1024, ge=16, description="score matrix + top-k workspace of one batch")
    history_days: int | None = Field(None, ge=1, description="history window in days ending at `date`; None: all ≤ date")
    min_weight: float | None = Field(None, description="binarization: keep events with weight >= this (None: all)")
    shard_events: int | None = Field(None, ge=1, description="events per shard; default: shard_events_for(budget)")
    max_batch: int = Field(4096, ge=1)
    parallel_shards: int | None = Field(None, ge=1, le=64, description=(
        "shards whose histories and whose checks + Parquet may be in flight at once, besides the one being "
        "scored; default: one per 4 CPU cores, at most 8. It matters where scoring is fast (a GPU) and host work "
        "is the bottleneck; there host memory grows with it (up to P shards' results, tables and checks at once)"))
    progress: bool = True


# -- sizing ---------------------------------------------------------------------------------------------

def batch_size_for(n_items: int, top_n: int, budget_mb: int, hidden: int = 600, max_batch: int = 4096) -> int:
    """Users per scoring batch so that one batch's workspace fits `budget_mb`.

    Per user: the float32 score row (4·I), the worst case of top-k's tie fixing (an int32 [I] row,
    metrics._fix_cut_ties), topk's values + indices (12·(k+1)) and the decoder's hidden rows (8·hidden).
    """
    k = min(top_n, n_items)
    per_user = 4 * n_items + 4 * n_items + 12 * (k + 1) + 8 * hidden
    fit = (budget_mb * 2**20) // per_user
    if fit < 1:
        raise DataError(f"a memory budget of {budget_mb} MB cannot hold one user's {n_items} scores",
                        f"raise --memory-budget-mb to at least {per_user // 2**20 + 1}")
    return int(min(fit, max_batch))


def default_parallel_shards() -> int:
    return max(1, min(8, (os.cpu_count() or 1) // 4))


SHARD_EVENTS_MAX = 4_000_000  # ~54k users of 74 events; a ~25 MB Parquet part at top-100


def shard_events_for(budget_mb: int) -> int:
    """Default events per shard: what the budget holds (a spilled event costs ~12 bytes on disk, ~60 bytes in
    memory while its shard is turned into a CSR), at most SHARD_EVENTS_MAX whatever the budget. Scoring cannot
    hide the first shard's histories or the last shard's publishing, and on a GPU those decide the end-to-end
    time: at 1M users on 2 cores, one 74M-event shard kept the main thread 19.3 s outside scoring, 9 shards
    3.8 s, 19 shards (this cap) 2.7 s; smaller sorts also cut host busy time (histories 10.3 -> 6.4 s)."""
    return min(SHARD_EVENTS_MAX, max(200_000, budget_mb * 2**20 // 64))


# -- events ---------------------------------------------------------------------------------------------

def open_events(uri: str) -> ds.Dataset:
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
    return dataset


def events_filter(dataset: ds.Dataset, cfg: InferConfig) -> ds.Expression:
    """Events up to and including cfg.date, inside the history window (dt partitions and/or event_ts)."""
    names = dataset.schema.names
    first = cfg.date - dt.timedelta(days=cfg.history_days - 1) if cfg.history_days else None
    expr = pc.is_valid(ds.field("user_id")) & pc.is_valid(ds.field("item_id"))
    if "dt" in names:
        dt_type = dataset.schema.field("dt").type  # string for dt= folders; a single file may hold dates
        if not (pa.types.is_string(dt_type) or pa.types.is_large_string(dt_type) or pa.types.is_date(dt_type)):
            raise DataError(f"events column dt has type {dt_type}", "store dt as YYYY-MM-DD strings or as dates")

        def day_value(day: dt.date) -> pa.Scalar:
            return pa.scalar(day if pa.types.is_date(dt_type) else day.isoformat(), type=dt_type)

        expr &= ds.field("dt") <= day_value(cfg.date)
        if first is not None:
            expr &= ds.field("dt") >= day_value(first)
    if "event_ts" in names and pa.types.is_timestamp(dataset.schema.field("event_ts").type):
        t = dataset.schema.field("event_ts").type
        tz = dt.UTC if t.tz else None

        def at(day: dt.date) -> pa.Scalar:
            return pa.scalar(dt.datetime(day.year, day.month, day.day, tzinfo=tz), type=t)

        expr &= ds.field("event_ts") < at(cfg.date + dt.timedelta(days=1))
        if first is not None:
            expr &= ds.field("event_ts") >= at(first)
    if cfg.min_weight is not None:  # silently keeping every event would publish unfiltered recommendations
        w = dataset.schema.field("weight").type if "weight" in names else None
        if w is None or not (pa.types.is_integer(w) or pa.types.is_floating(w)):
            raise DataError(f"--min-weight needs a numeric weight column; the events have "
                            f"{'none' if w is None else f'one of type {w}'}",
                            "drop --min-weight, or pass events with a numeric weight column")
        expr &= ds.field("weight") >= cfg.min_weight
    return expr


def vocabulary(bundle: ModelBundle) -> pa.Array:
    ids = bundle.item_ids
    return pa.array(ids.astype(np.int64)) if np.issubdtype(ids.dtype, np.integer) else pa.array(ids.astype(str))


def _dense_lookup(vocab: pa.Array) -> np.ndarray | None:
    """For integer ids in a compact range: lut[id] = column (-1 where unknown, and in one slot past the largest
    id, where map_items sends ids outside the table); else None (hash lookup)."""
    if not pa.types.is_integer(vocab.type) or len(vocab) == 0 or vocab.null_count:
        return None
    ids = vocab.to_numpy().astype(np.int64)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= 16 * len(ids) + (1 << 20):  # sparse ids: a table would waste memory
        return None
    lut = np.full(hi + 2, -1, np.int32)
    lut[ids] = np.arange(len(ids), dtype=np.int32)
    return lut


def map_items(items: pa.Array, vocab: pa.Array, lut: np.ndarray | None = None) -> np.ndarray:
    """External item ids → model columns (int32), -1 for ids the model does not know.

    `lut` (from `_dense_lookup(vocab)`) turns the hash lookup into one gather: several times faster for the
    usual integer ids."""
    if items.type != vocab.type:
        try:
            items = items.cast(vocab.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # e.g. string ids against an int vocabulary
            return np.full(len(items), -1, np.int32)
    if lut is not None and items.null_count == 0:
        # as unsigned, negative ids are huge too: one clamp sends every id outside the table to its -1 slot
        ids = items.to_numpy().astype(np.int64, copy=False).view(np.uint64)
        return lut[np.minimum(ids, np.uint64(len(lut) - 1))]
    idx = pc.index_in(items, value_set=vocab)
    return idx.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int32)


SPILL_BATCH_ROWS = 1 << 20


def max_spill_shards() -> int:
    """Shard files the spill may keep open at once: half the soft open-files limit (`ulimit -n`), leaving the
    rest to the Parquet readers, the model's libraries and the publisher."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft > 1 << 20:
        soft = 1 << 20
    return max(1, soft // 2)


class Spill:
    """Events split into n local shard files (Arrow IPC streams of user_id, col) by user hash."""

    def __init__(self, directory: Path, n_shards: int, user_type: pa.DataType):
        self.dir = directory
        self.n = n_shards
        self.schema = pa.schema([("user_id", user_type), ("col", pa.int32())])
        # Files opened here, not by path: a writer's close() keeps a file it opened itself open until garbage
        # collection, which kept every shard's descriptor (and the disk of unlinked shards) for the whole run.
        self.files: list[pa.NativeFile] = []
        self.writers: list[pa.ipc.RecordBatchStreamWriter] = []
        self.events = 0
        try:
            for s in range(n_shards):
                self.files.append(pa.OSFile(str(directory / f"shard-{s:05d}.arrow"), "wb"))
                self.writers.append(pa.ipc.new_stream(self.files[-1], self.schema))
        except BaseException:
            self.close()  # the files opened so far
            raise

    def split(self, users: pa.Array, cols: np.ndarray) -> list[tuple[int, pa.RecordBatch]]:
        """(shard, rows) pieces of one batch of events; pure, so batches can be split in worker threads."""
        if self.n == 1:
            return [(0, pa.record_batch([users, pa.array(cols)], schema=self.schema))]
        shard = shard_of(users, self.n)  # the readers' rule too (pipeline.recs looks a user's part up by it)
        order = np.argsort(shard, kind="stable")
        bounds = np.searchsorted(shard[order], np.arange(self.n + 1))
        users_sorted = users.take(pa.array(order))
        cols_sorted = cols[order]
        return [(s, pa.record_batch([users_sorted.slice(a, b - a), pa.array(cols_sorted[a:b])], schema=self.schema))
                for s, (a, b) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)) if b > a]

    def write(self, pieces: list[tuple[int, pa.RecordBatch]]) -> None:
        for s, rows in pieces:
            self.writers[s].write_batch(rows)
            self.events += rows.num_rows

    def close(self) -> None:
        try:
            for w in self.writers:
                w.close()
        finally:
            for f in self.files:
                f.close()

    def shard(self, s: int) -> pa.Table:
        with pa.ipc.open_stream(str(self.dir / f"shard-{s:05d}.arrow")) as r:
            return r.read_all()


def spill_events(dataset: ds.Dataset, cfg: InferConfig, vocab: pa.Array, directory: Path) -> tuple[Spill, dict[str, int]]:
    """One streaming pass over the events: map items to columns, count unknowns, split users into shards."""
    expr = events_filter(dataset, cfg)
    user_type = dataset.schema.field("user_id").type
    if pa.types.is_integer(user_type) or pa.types.is_large_string(user_type):
        user_type = pa.int64() if pa.types.is_integer(user_type) else pa.string()
    per_shard = cfg.shard_events or shard_events_for(cfg.memory_budget_mb)
    # Row counts come from Parquet metadata (cheap); the filter may drop some, so shards are at most this big.
    estimate = dataset.count_rows(filter=expr)
    if estimate == 0:
        raise DataError(f"no events up to {cfg.date} in {cfg.events}", "check --events and --date (and --history-days)")
    n_shards, limit = max(1, -(-estimate // per_shard)), max_spill_shards()
    if n_shards > limit:  # one open file per shard: beyond the limit the spill would die with EMFILE
        raise DataError(f"{estimate} events in shards of {per_shard} need {n_shards} spill files open at once, more "
                        f"than the {limit} allowed (half the open-files limit, `ulimit -n`)",
                        f"pass --shard-events {-(-estimate // limit)} or more (by default the shard size follows "
                        f"--memory-budget-mb, at most {SHARD_EVENTS_MAX} events), or raise `ulimit -n`")
    spill = Spill(directory, n_shards, user_type)
    unknown_events = 0
    unknown: set[Any] = set()
    lut = _dense_lookup(vocab)

    def prepare(batch: pa.RecordBatch) -> tuple[list[tuple[int, pa.RecordBatch]], int, list[Any]]:
        items = batch.column(1)
        cols = map_items(items, vocab, lut)
        miss = cols < 0
        missing = pc.unique(items.filter(pa.array(miss))).to_pylist() if miss.any() else []  # bounded by the catalog
        return spill.split(batch.column(0).cast(user_type), cols), int(miss.sum()), missing

    # Batches are mapped and split in worker threads (numpy and Arrow release the GIL) and written here in scan
    # order, so the shard files are the same as a serial pass; a bounded window of batches is in flight.
    threads = max(1, min(4, os.cpu_count() or 1))
    try:
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="spill") as pool:
            window: deque[Future[tuple[list[tuple[int, pa.RecordBatch]], int, list[Any]]]] = deque()

            def drain(keep: int) -> None:
                nonlocal unknown_events
                while len(window) > keep:
                    pieces, n_missing, missing = window.popleft().result()
                    spill.write(pieces)
                    unknown_events += n_missing
                    unknown.update(missing)

            try:
                # Bounded read-ahead: Arrow's defaults (16 batches x 4 files) held 4.6 GiB on ten 74M-row files
                for batch in dataset.to_batches(columns=["user_id", "item_id"], filter=expr, batch_size=SPILL_BATCH_ROWS,
                                                batch_readahead=2, fragment_readahead=1):
                    if batch.num_rows:
                        window.append(pool.submit(prepare, batch))
                        drain(threads)
                drain(0)
            except BaseException:
                for f in window:
                    f.cancel()
                raise
    finally:
        spill.close()
    return spill, {"events": spill.events, "unknown_item_events": unknown_events, "unknown_items": len(unknown)}


def shard_histories(table: pa.Table) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """Spilled (user_id, col) rows → (distinct users sorted, indptr, known cols per user, deduplicated).

    One sort of (user, col + 1) keys does it all: distinct users are the runs of the high bits, col + 1 == 0
    marks an event whose item the model lacks (its user stays active, for the fallback). Integer ids within a
    2^32 range go straight into the key; others are numbered first (pd.factorize). np.unique(return_inverse)
    was 5x slower here: it argsorts, and numpy's argsort is not vectorized like its sort."""
    users = table.column("user_id").combine_chunks()
    cols = table.column("col").to_numpy()
    decode: Callable[[np.ndarray], pa.Array]
    if pa.types.is_integer(users.type):
        u = users.to_numpy()
        lo, hi = (int(u.min()), int(u.max())) if len(u) else (0, 0)
        if hi - lo < 1 << 32:
            ukey = u - np.int64(lo)
            decode = lambda k: pa.array(k + lo, pa.int64())  # noqa: E731
        else:
            ukey, cats = pd.factorize(u, sort=True)
            decode = lambda k: pa.array(cats[k], pa.int64())  # noqa: E731
    else:
        ukey, cats = pd.factorize(np.asarray(users.to_numpy(zero_copy_only=False), dtype=object), sort=True)
        decode = lambda k: pa.array(cats[k].astype(str), pa.string())  # noqa: E731
    key = np.sort((ukey.astype(np.int64) << 31) | (cols.astype(np.int64) + 1))
    if len(key) > 1:
        key = key[np.r_[True, key[1:] != key[:-1]]]  # dedup (user, item)
    high, low = key >> 31, key & ((1 << 31) - 1)
    starts = np.flatnonzero(np.r_[True, high[1:] != high[:-1]]) if len(key) else np.zeros(0, np.int64)
    known = low != 0
    # After the dedup a user has at most one unknown entry (low == 0), and it sorts first in the user's run.
    # Counting from the run starts avoids a cumsum + bincount over every event (0.78 -> 0.59 s on a 226k-user shard).
    lengths = np.diff(np.r_[starts, len(key)]) - ~known[starts]
    indptr = np.zeros(len(starts) + 1, np.int64)
    np.cumsum(lengths, out=indptr[1:])
    return decode(high[starts]), indptr, (low[known] - 1).astype(np.int32)


# -- scoring --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def scoring_precision(precision: str, device: str) -> Iterator[str]:
    """Precision of the scoring matmuls; yields the one in effect.

    fp32: exact. tf32 (CUDA only; the CPU stays fp32): matmuls on tensor cores with fp32 storage and
    accumulation, ~10-bit mantissa inputs; scores and top-k are still fp32. bf16: autocast (half the memory
    traffic; scores rounded to bf16 before the top-k, so more near-ties). Any precision passes the output checks:
    they hold for the scores the model produced, whatever their rounding.
    """
    import torch

    cuda = torch.device(device).type == "cuda"
    chosen = ("tf32" if cuda else "fp32") if precision == "auto" else precision
    if chosen == "tf32" and not cuda:
        chosen = "fp32"
    if chosen == "bf16":
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
            yield chosen
    elif chosen == "tf32":
        before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            yield chosen
        finally:
            torch.backends.cuda.matmul.allow_tf32 = before
    else:
        yield chosen


def score_histories(bundle: ModelBundle, indptr: np.ndarray, cols: np.ndarray, top_n: int, batch_size: int,
                    on_batch: Callable[[int], None] | None = None,
                    precision: str = "fp32") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-N columns and scores for users given as CSR rows over the model's columns, seen items removed.

    Returns ([U, k] int64 columns, [U, k] float32 scores, [U] bool fallback). Users with no known item get
    the popularity fallback. Seen items come back as -inf (only when fewer than k unseen items exist);
    `to_table` drops them.
    """
    import scipy.sparse as sp

    n, n_items = len(indptr) - 1, bundle.n_items
    k = min(top_n, n_items)
    top = np.empty((n, k), np.int64)
    scores = np.empty((n, k), np.float32)
    fallback = np.diff(indptr) == 0
    fb_items, fb_scores = bundle.fallback(k)
    top[fallback], scores[fallback] = fb_items, fb_scores
    if on_batch is not None and fallback.any():
        on_batch(int(fallback.sum()))
    known = np.flatnonzero(~fallback)
    if len(known):
        csr = sp.csr_matrix((np.ones(len(cols), np.float32), cols, indptr), shape=(n, n_items))
        csr.has_canonical_format = True  # shard_histories gives sorted, unique columns per row
        sub = csr[known] if len(known) < n else csr
        with scoring_precision(precision, str(bundle.recommender.device)):
            t, s = bundle.recommend(sub, k, batch_size=batch_size, on_batch=on_batch)
        top[known], scores[known] = t, s
    return top, scores, fallback


def to_table(users: pa.Array, top: np.ndarray, scores: np.ndarray, fallback: np.ndarray, vocab: pa.Array,
             model_version: str) -> pa.Table:
    valid = scores != -np.inf  # seen items padded in by top-k when the catalog is nearly exhausted
    lengths = valid.sum(axis=1)
    offsets = np.zeros(len(users) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] == top.size:  # the usual case: every list full, so the rows are already the flat values
        flat_cols, flat_scores = top.reshape(-1), scores.reshape(-1)
    else:
        flat_cols, flat_scores = top[valid], scores[valid]
    item_ids = pa.ListArray.from_arrays(pa.array(offsets), vocab.take(pa.array(flat_cols)))
    score_lists = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat_scores, pa.float32()))
    return pa.table({"user_id": users, "item_ids": item_ids, "scores": score_lists,
                     "model_version": pa.array([model_version] * len(users), pa.string()),
                     "fallback": pa.array(fallback, pa.bool_())})


# -- output checks --------------------------------------------------------------------------------------

class OutputCheckError(DataError):
    def __init__(self, problem: str, fix: str = "nothing was published; fix the model or the job and re-run") -> None:
        super().__init__(f"output check failed: {problem}", fix)


def check_part(table: pa.Table, users: pa.Array, indptr: np.ndarray, cols: np.ndarray, vocab: pa.Array,
               top_n: int, model_version: str) -> None:
    """Check a shard's output against its histories before it may be published (raises OutputCheckError)."""
    n, n_items = len(users), len(vocab)
    if table.schema.names != list(OUTPUT_SCHEMA_FIELDS):
        raise OutputCheckError(f"columns {table.schema.names}, expected {list(OUTPUT_SCHEMA_FIELDS)}")
    out_users = table.column("user_id").combine_chunks()
    if pc.count_distinct(out_users).as_py() != table.num_rows:
        raise OutputCheckError("duplicate users in the output")
    if table.num_rows != n:
        raise OutputCheckError(f"{table.num_rows} rows for {n} active users (one row per active user)")
    row = pc.index_in(out_users, value_set=users)  # output row → history row
    if row.null_count:
        raise OutputCheckError("output users that are not active users")
    hrow = row.to_numpy().astype(np.int64)
    seen = np.diff(indptr)[hrow]
    fb = table.column("fallback").to_numpy()
    if not np.array_equal(fb, seen == 0):
        raise OutputCheckError("the fallback flag differs from 'no known item in the history'")
    mv = table.column("model_version")
    if mv.null_count or pc.count_distinct(mv).as_py() > 1 or (n and mv[0].as_py() != model_version):
        raise OutputCheckError(f"model_version is not {model_version!r} on every row")
    items = table.column("item_ids").combine_chunks()
    scores = table.column("scores").combine_chunks()
    lengths = pc.list_value_length(items).fill_null(-1).to_numpy()
    expected = np.minimum(top_n, n_items - seen)
    if not np.array_equal(lengths, expected):
        bad = int(np.flatnonzero(lengths != expected)[0])
        raise OutputCheckError(f"user {out_users[bad].as_py()} has {lengths[bad]} items, expected {expected[bad]} "
                               f"(N distinct unseen items, fewer only when the catalog is smaller)")
    if not np.array_equal(pc.list_value_length(scores).fill_null(-1).to_numpy(), lengths):
        raise OutputCheckError("scores and item_ids differ in length")
    c = map_items(items.flatten(), vocab, _dense_lookup(vocab))
    if (c < 0).any():
        raise OutputCheckError("recommended items outside the model's vocabulary")
    _check_lists_against_histories(hrow, lengths, c, indptr, cols, n_items)
    s = scores.flatten().to_numpy(zero_copy_only=False)
    if not np.isfinite(s).all():
        raise OutputCheckError("non-finite scores")
    starts = np.zeros(len(s), bool)
    offs = np.cumsum(lengths)[:-1]
    starts[offs[offs < len(s)]] = True  # first entry of each list: no order across users
    if len(s) > 1 and np.any((np.diff(s) > 0) & ~starts[1:]):
        raise OutputCheckError("scores are not in descending order")


def user_range(users: pa.Array) -> dict[str, Any]:
    """A part's smallest and largest user id, for its manifest entry (readers skip parts outside the range)."""
    lo_hi = pc.min_max(users)
    return {"user_min": lo_hi["min"].as_py(), "user_max": lo_hi["max"].as_py()}


CHECK_CHUNK_USERS = 16_384  # most users per chunk of the list checks
# The chunk's [users, n_items] int32 marks. At least 64 users: beyond 131k items they exceed this (256 MB at 1M
# items, where 64-user chunks check as fast as the key sort they replaced; 16-user chunks were 1.4x slower).
CHECK_MARK_BYTES = 32 << 20


def _concat_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lengths)]) without the Python loop."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    firsts = np.cumsum(lengths) - lengths
    return np.repeat(starts - firsts, lengths) + np.arange(total)


def _check_lists_against_histories(hrow: np.ndarray, lengths: np.ndarray, c: np.ndarray, indptr: np.ndarray,
                                   cols: np.ndarray, n_items: int) -> None:
    """No list repeats an item, no list holds a seen item. hrow (output row → history row) is a permutation
    (checked before), so taking output rows in history order, chunk by chunk, pairs each chunk with one
    contiguous slice of the CSR.

    Each chunk marks its cells in a dense [users, n_items] int32 array, reused from chunk to chunk: seen cells
    get -1 (reset after the chunk), then each recommended cell its position in the chunk. A recommended cell
    reading -1 is seen; one not reading back its own position was written twice (a repeat). Random access
    within a user's row stays in cache, so this is faster than sorting the (user, item) keys and searching
    them in the CSR, which it replaced (docs/benchmarks.md, "Host work per shard cut")."""
    n = len(hrow)
    by_hist = np.argsort(hrow, kind="stable")  # output rows in history order
    out_start = np.cumsum(lengths) - lengths
    step = min(CHECK_CHUNK_USERS, max(64, CHECK_MARK_BYTES // (4 * max(n_items, 1))))
    mark = np.zeros(min(step, n) * n_items, np.int32)
    for a in range(0, n, step):
        b = min(n, a + step)
        rows = by_hist[a:b]
        lens = lengths[rows]
        rec = np.repeat(np.arange(b - a, dtype=np.int64) * n_items, lens) + c[_concat_ranges(out_start[rows], lens)]
        lo, hi = int(indptr[a]), int(indptr[b])
        seen = np.repeat(np.arange(b - a, dtype=np.int64) * n_items, np.diff(indptr[a:b + 1])) + cols[lo:hi]
        mark[seen] = -1
        if np.any(mark[rec] == -1):
            raise OutputCheckError("a user is recommended an item they have already seen")
        pos = np.arange(1, len(rec) + 1, dtype=np.int32)
        mark[rec] = pos
        if np.any(mark[rec] != pos):
            raise OutputCheckError("a user's list repeats an item")
        mark[seen] = 0  # a stale position is harmless (every recommended cell is written before it is read)


def finalize_part(table: pa.Table) -> pa.Table:
    """The last step before a part is checked (a seam for tests that corrupt output)."""
    return table


# -- the job --------------------------------------------------------------------------------------------

def load_model(model_uri: str, device: str | None) -> tuple[ModelBundle, str]:
    """models:/NAME@ALIAS → (bundle, concrete version): the alias is resolved once.

    A local folder written by ModelBundle.save also works (development, tests): its version is
    "local-" + the weights' checksum, so outputs still name exactly which weights made them."""
    if not model_uri.startswith("models:/"):
        import hashlib

        from pipeline.bundle import ModelBundle

        path = Path(model_uri)
        if not (path / "bundle.json").is_file():
            raise DataError(f"--model {model_uri!r} is neither models:/NAME@ALIAS nor a saved bundle folder",
                            "pass models:/NAME@champion (or a folder with bundle.json)")
        digest = hashlib.sha256((path / "recommender.pt").read_bytes()).hexdigest()[:12]
        return ModelBundle.load(path, device), f"local-{digest}"
    from pipeline.registry import load_bundle  # lazy: MLflow is heavy and only needed here

    return load_bundle(model_uri, device=device)


def _precision_in_effect(precision: str, device: str) -> str:
    with scoring_precision(precision, device) as chosen:
        return chosen


def _resolve_device(name: str) -> str:
    from model.train import resolve_device

    return str(resolve_device(name))


class PhaseClock:
    """Busy seconds per named phase, summed over shards and threads (recorded in the manifest: where a run's
    time went). Phases run in overlapping threads, so they can add up to more than the wall time. The main
    thread's own time is spill + wait_histories + score + wait_publish: the waits are what scoring could not
    hide (the first shard's histories, the last shard's publishing, and any shard where host work was slower)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            with self._lock:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t

    def rounded(self) -> dict[str, float]:
        with self._lock:
            return {k: round(v, 3) for k, v in self.seconds.items()}


class Progress:
    def __init__(self, enabled: bool, total: int | None = None):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="user", unit_scale=True, disable=not enabled, desc="scoring")

    def __call__(self, n: int) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def run(cfg: InferConfig, bundle: ModelBundle | None = None, model_version: str | None = None) -> dict[str, Any]:
    """Score every active user for cfg.date and publish `<out>/recommendations/dt=DATE/`. Returns the manifest."""
    t0 = time.perf_counter()
    device = _resolve_device(cfg.device)
    if bundle is None:
        bundle, model_version = load_model(cfg.model, device)
    else:
        bundle.recommender.to(device)
        if model_version is None:
            raise ValueError("pass model_version with an explicit bundle")
    assert model_version is not None
    out = lake.resolve(cfg.out)
    partition = out.join("recommendations", f"dt={cfg.date.isoformat()}")
    writer = PartitionWriter(partition)
    if cfg.engine == "spark":
        from pipeline.infer_spark import run_spark

        stats = run_spark(cfg, bundle, model_version, writer)
    else:
        stats = _run_local(cfg, bundle, model_version, writer)
    extra = {"date": cfg.date.isoformat(), "model_uri": cfg.model, "model_version": str(model_version),
             "model_name": bundle.name, "snapshot_id": bundle.snapshot_id, "n_items": bundle.n_items,
             "top_n": cfg.top_n, "engine": cfg.engine, "precision": _precision_in_effect(cfg.precision, device),
             "history_days": cfg.history_days, **stats,
             "seconds": round(time.perf_counter() - t0, 3)}
    return writer.commit(extra)


def _run_local(cfg: InferConfig, bundle: ModelBundle, model_version: str, writer: PartitionWriter) -> dict[str, Any]:
    """Spill, then a pipeline over shards: while shard s is scored here, worker threads build the histories of
    the next P shards and turn up to P scored shards into tables, check and write them (numpy, Arrow and
    Parquet release the GIL). P = cfg.parallel_shards (1 on small machines: three shards in memory at most,
    whatever the number of users). Parts are named by shard, so the output does not depend on P or timing."""
    dataset = open_events(cfg.events)
    vocab = vocabulary(bundle)
    bs = batch_size_for(bundle.n_items, cfg.top_n, cfg.memory_budget_mb, max_batch=cfg.max_batch)
    depth = cfg.parallel_shards or default_parallel_shards()
    tmp = Path(tempfile.mkdtemp(prefix="recsys-infer-"))
    stats: dict[str, Any] = {"batch_size": bs, "parallel_shards": depth}
    fallback_users = 0
    fallback_lock = threading.Lock()
    clock = PhaseClock()

    def load(s: int) -> tuple[pa.Array, np.ndarray, np.ndarray]:
        with clock("histories"):
            h = shard_histories(spill.shard(s))
            (tmp / f"shard-{s:05d}.arrow").unlink()  # release disk as we go
            return h

    def publish(s: int, users: pa.Array, indptr: np.ndarray, cols: np.ndarray, top: np.ndarray, scores: np.ndarray,
                fb: np.ndarray) -> None:
        with clock("table"):
            table = finalize_part(to_table(users, top, scores, fb, vocab, model_version))
        with clock("check"):
            check_part(table, users, indptr, cols, vocab, cfg.top_n, model_version)
        with clock("write"):
            writer.write_part(table, part=s, shard=s, **user_range(users))
        nonlocal fallback_users
        with fallback_lock:
            fallback_users += int(fb.sum())

    try:
        with clock("spill"):
            spill, counts = spill_events(dataset, cfg, vocab, tmp)
        stats |= counts | {"shards": spill.n,
                           "user_sharding": {"scheme": scheme_for(spill.schema.field("user_id").type), "n_shards": spill.n}}
        hook("spilled")
        bar = Progress(cfg.progress)
        # Leaving this block waits for the workers, so nothing is written after an abort below.
        with ThreadPoolExecutor(max_workers=2 * depth, thread_name_prefix="infer") as pool:
            loads: deque[Future[tuple[pa.Array, np.ndarray, np.ndarray]]] = deque(
                pool.submit(load, s) for s in range(min(depth, spill.n)))
            parts: deque[Future[None]] = deque()
            try:
                for s in range(spill.n):
                    with clock("wait_histories"):
                        users, indptr, cols = loads.popleft().result()
                    if s + depth < spill.n:
                        loads.append(pool.submit(load, s + depth))
                    if len(users) == 0:
                        continue
                    with clock("score"):
                        top, scores, fb = score_histories(bundle, indptr, cols, cfg.top_n, bs, bar, cfg.precision)
                    with clock("wait_publish"):
                        while len(parts) >= depth:
                            parts.popleft().result()  # at most `depth` parts in flight; an error surfaces here
                    parts.append(pool.submit(publish, s, users, indptr, cols, top, scores, fb))
                    del users, indptr, cols, top, scores, fb
                with clock("wait_publish"):
                    while parts:
                        parts.popleft().result()
            except BaseException:
                queued: list[Future[Any]] = [*loads, *parts]
                for f in queued:
                    f.cancel()  # queued work is dropped; running work finishes before the pool exits
                raise
        bar.close()
    except BaseException:
        writer.abort()  # best effort: an uncommitted run folder is invisible anyway and removed by the next run
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return stats | {"active_users": writer.rows, "fallback_users": fallback_users,
                    "score_seconds": round(clock.seconds.get("score", 0.0), 3), "phase_seconds": clock.rounded()}
