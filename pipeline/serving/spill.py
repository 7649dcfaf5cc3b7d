"""The local engine's one pass over the events: stream them, map items to model columns, count the unknown
ones, and split the (user, column) rows into shard files on the local disk by a hash of the user id
(pipeline.serving.sharding, the rule readers use to find a user's part). Each shard then holds every event of
its users and a bounded number of events, so the later steps' memory does not grow with the user count.
"""

from __future__ import annotations

import os
import resource
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from pipeline.errors import DataError
from pipeline.serving.events import events_filter
from pipeline.serving.options import InferOptions
from pipeline.serving.sharding import shard_of
from pipeline.serving.sizing import SHARD_EVENTS_MAX, shard_events_for
from pipeline.serving.vocab import dense_lookup, map_items

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
                self.files.append(pa.OSFile(str(self.path(s)), "wb"))
                self.writers.append(pa.ipc.new_stream(self.files[-1], self.schema))
        except BaseException:
            self.close()  # the files opened so far
            raise

    def path(self, s: int) -> Path:
        """The file of shard `s`."""
        return self.dir / f"shard-{s:05d}.arrow"

    def split(self, users: pa.Array, cols: np.ndarray) -> list[tuple[int, pa.RecordBatch]]:
        """(shard, rows) pieces of one batch of events; pure, so batches can be split in worker threads."""
        if self.n == 1:
            return [(0, pa.record_batch([users, pa.array(cols)], schema=self.schema))]
        shard = shard_of(users, self.n)  # the readers' rule too (pipeline.serving.recs looks a user's part up by it)
        order = np.argsort(shard, kind="stable")
        bounds = np.searchsorted(shard[order], np.arange(self.n + 1))
        users_sorted = users.take(pa.array(order))
        cols_sorted = cols[order]
        return [(s, pa.record_batch([users_sorted.slice(a, b - a), pa.array(cols_sorted[a:b])], schema=self.schema))
                for s, (a, b) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)) if b > a]

    def write(self, pieces: list[tuple[int, pa.RecordBatch]]) -> None:
        """Append pieces from `split` to their shard files (one thread at a time, in scan order)."""
        for s, rows in pieces:
            self.writers[s].write_batch(rows)
            self.events += rows.num_rows

    def close(self) -> None:
        """Finish every shard stream and close its file (safe to call after a partial __init__)."""
        try:
            for w in self.writers:
                w.close()
        finally:
            for f in self.files:
                f.close()

    def shard(self, s: int) -> pa.Table:
        """Shard `s`'s rows (after `close`)."""
        with pa.ipc.open_stream(str(self.path(s))) as r:
            return r.read_all()


def spill_events(dataset: ds.Dataset, opts: InferOptions, vocab: pa.Array, directory: Path) -> tuple[Spill, dict[str, int]]:
    """One streaming pass over the events: map items to columns, count unknowns, split users into shards."""
    expr = events_filter(dataset, opts)
    user_type = dataset.schema.field("user_id").type
    if pa.types.is_integer(user_type) or pa.types.is_large_string(user_type):
        user_type = pa.int64() if pa.types.is_integer(user_type) else pa.string()
    per_shard = opts.shard_events or shard_events_for(opts.memory_budget_mb)
    # Row counts come from Parquet metadata (cheap); the filter may drop some, so shards are at most this big.
    estimate = dataset.count_rows(filter=expr)
    if estimate == 0:
        raise DataError(f"no events up to {opts.date} in {opts.events}", "check --events and --date (and --history-days)")
    n_shards, limit = max(1, -(-estimate // per_shard)), max_spill_shards()
    if n_shards > limit:  # one open file per shard: beyond the limit the spill would die with EMFILE
        raise DataError(f"{estimate} events in shards of {per_shard} need {n_shards} spill files open at once, more "
                        f"than the {limit} allowed (half the open-files limit, `ulimit -n`)",
                        f"pass --shard-events {-(-estimate // limit)} or more (by default the shard size follows "
                        f"--memory-budget-mb, at most {SHARD_EVENTS_MAX} events), or raise `ulimit -n`")
    spill = Spill(directory, n_shards, user_type)
    unknown_events = 0
    unknown: set[Any] = set()
    lut = dense_lookup(vocab)

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
