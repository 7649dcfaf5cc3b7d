"""The local engine's one pass over the events: stream them, map items to model columns, count the unknown
ones, and split the (user, column) rows into shard files on the local disk by a hash of the user id
(pipeline.serving.sharding, the rule readers use to find a user's part). Each shard then holds every event of
its users and a bounded number of events, so the later steps' memory does not grow with the user count.

`spill_dir` is the run's scratch folder under the temp dir (both engines): it holds a lock for as long as the
run lives, and each run first removes the folders that no live run holds (a run killed with SIGKILL cannot
remove its own).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import resource
import shutil
import stat
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from pipeline.errors import DataError
from pipeline.serving.events import check_user_ids, events_filter
from pipeline.serving.options import InferOptions
from pipeline.serving.sharding import shard_of
from pipeline.serving.sizing import SHARD_EVENTS_MAX, shard_events_for
from pipeline.serving.vocab import dense_lookup, map_items

SPILL_BATCH_ROWS = 1 << 20
SPILL_PREFIX = "recsys-infer-"  # the Spark engine's "recsys-infer-spark-" folders match it too
OWNER = "owner.lock"  # flock'ed by the run that owns the folder; the kernel drops the lock when it dies
STALE_SECONDS = 3600  # a folder without an owner file (older code, or a run killed while creating it) after this

log = logging.getLogger(__name__)
ARROW_DATA_ERRORS = (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError)


def unreadable_events(uri: str, e: Exception) -> DataError:
    """Files whose columns disagree with the first one's (the dataset's schema), or damaged files."""
    return DataError(f"cannot read the events at {uri}: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                     "give every events file the same columns and types (user_id, item_id: int64 or string; "
                     "event_ts: a timestamp), or rewrite the damaged file")


def remove_stale_spill_dirs(root: str | Path | None = None) -> list[Path]:
    """Remove this user's `recsys-infer-*` folders under `root` (default: the temp dir) that no live run holds:
    their owner lock can be taken (its run died), or they have no owner file and are older than STALE_SECONDS.
    A folder whose lock is held is left alone, whichever process (or container sharing the disk) holds it."""
    removed = []
    for d in Path(root or tempfile.gettempdir()).glob(SPILL_PREFIX + "*"):
        try:
            st = d.lstat()
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            continue
        try:
            fd = os.open(d / OWNER, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            if time.time() - st.st_mtime > STALE_SECONDS:
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
            continue
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live run's folder
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
        finally:
            os.close(fd)
    if removed:
        log.info("removed %d stale spill folder(s) of killed runs: %s", len(removed), ", ".join(map(str, removed)))
    return removed


@contextlib.contextmanager
def spill_dir(prefix: str = SPILL_PREFIX) -> Iterator[Path]:
    """A fresh scratch folder under the temp dir for one run, locked while the run lives and removed after it;
    stale folders of killed runs are removed first (`remove_stale_spill_dirs`)."""
    remove_stale_spill_dirs()
    d = Path(tempfile.mkdtemp(prefix=prefix))
    fd = -1
    try:
        # locked under another name, then renamed: a sweeper never sees an owner file that is not locked yet
        fd = os.open(d / (OWNER + ".new"), os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, f"{os.getpid()}\n".encode())  # for people; the lock is what counts
        os.rename(d / (OWNER + ".new"), d / OWNER)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
        if fd >= 0:
            os.close(fd)


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
    try:
        estimate = dataset.count_rows(filter=expr)
    except ARROW_DATA_ERRORS as e:
        raise unreadable_events(opts.events, e) from e
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
        users = batch.column(0).cast(user_type)
        check_user_ids(users, opts.events)
        return spill.split(users, cols), int(miss.sum()), missing

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
    except ARROW_DATA_ERRORS as e:
        raise unreadable_events(opts.events, e) from e
    finally:
        spill.close()
    return spill, {"events": spill.events, "unknown_item_events": unknown_events, "unknown_items": len(unknown)}
