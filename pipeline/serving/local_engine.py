"""The local engine: every active user scored in this process, shard by shard, in bounded memory.

    events ──spill (one streaming pass)──▶ shard files (users hashed) ──per shard──▶ histories (CSR)
        ──batches──▶ scores, seen masked, top N ──▶ table ──▶ checks ──▶ part file staged in the run folder (PartitionWriter)

The steps overlap across shards: while one shard is scored in the main thread, worker threads build the
histories of the next shards and turn scored shards into checked Parquet parts (numpy, Arrow and Parquet
release the GIL). `parallel_shards` bounds how many, so memory is bounded by the shard size, not the user
count. Parts are named by shard, so the output does not depend on the parallelism or on timing. `PhaseClock`
records where the time went (the manifest's phase_seconds); `Progress` is the scoring bar.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from pipeline.io.publish import PartitionWriter, hook
from pipeline.serving import checks
from pipeline.serving.availability import load_availability
from pipeline.serving.cold_items import ColdItems, cold_stats, extend_mask, extend_vocab
from pipeline.serving.events import open_events
from pipeline.serving.exclusions import Exclusions, load_exclusions
from pipeline.serving.histories import shard_histories
from pipeline.serving.options import InferOptions
from pipeline.serving.precision import choose_precision, guard_bf16
from pipeline.serving.scoring import score_histories, to_table
from pipeline.serving.sharding import scheme_for
from pipeline.serving.sizing import batch_size_for, default_parallel_shards
from pipeline.serving.spill import spill_dir, spill_events
from pipeline.serving.vocab import vocabulary

if TYPE_CHECKING:
    from pipeline.io.bundle import ModelBundle

Blocked = tuple[np.ndarray, np.ndarray] | None  # a shard's excluded columns as CSR parts (pipeline.serving.exclusions)


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
        """The seconds so far, rounded to milliseconds (for the manifest)."""
        with self._lock:
            return {k: round(v, 3) for k, v in self.seconds.items()}


class Progress:
    """A tqdm bar of users scored (disabled: a no-op)."""

    def __init__(self, enabled: bool, total: int | None = None):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="user", unit_scale=True, disable=not enabled, desc="scoring")

    def __call__(self, n: int) -> None:
        self.bar.update(n)

    def close(self) -> None:
        """Close the bar."""
        self.bar.close()


def run_local(opts: InferOptions, bundle: ModelBundle, model_version: str, writer: PartitionWriter,
              cold: ColdItems | None = None) -> dict[str, Any]:
    """Score and write every active user's part through `writer` (not committed); returns the manifest's stats.

    Spill, then a pipeline over shards: while shard s is scored here, worker threads build the histories of
    the next P shards and turn up to P scored shards into tables, check and write them. P = opts.parallel_shards
    (1 on small machines: three shards in memory at most, whatever the number of users). On any error the
    run's folder is removed (`writer.abort()`) and nothing is written after it. `cold`: the day's new items
    (pipeline.serving.cold_items), merged into the lists; the published vocabulary is the model's plus them, and
    the exclusion list is resolved against it (a user's excluded new item is never merged into their list)."""
    dataset = open_events(opts.events)
    vocab = vocabulary(bundle)
    out_vocab = extend_vocab(vocab, cold)  # what the published lists may name
    bs = batch_size_for(bundle.n_items, opts.top_n, opts.memory_budget_mb, max_batch=opts.max_batch)
    depth = opts.parallel_shards or default_parallel_shards()
    stats: dict[str, Any] = {"batch_size": bs, "parallel_shards": depth}
    fallback_users = 0
    fallback_lock = threading.Lock()
    clock = PhaseClock()
    choice = choose_precision(opts.precision, str(bundle.recommender.device), bundle)  # checked on shard 1 (guard)

    def load(s: int) -> tuple[pa.Array, np.ndarray, np.ndarray, Blocked]:
        with clock("histories"):
            users, indptr, cols = shard_histories(spill.shard(s))
            spill.path(s).unlink()  # release disk as we go
        if exclusions is None:
            return users, indptr, cols, None
        with clock("exclusions"):  # this shard's users' excluded columns (CSR over its rows)
            return users, indptr, cols, exclusions.for_users(users)

    def publish(s: int, users: pa.Array, indptr: np.ndarray, cols: np.ndarray, top: np.ndarray, scores: np.ndarray,
                fb: np.ndarray, blocked: Blocked) -> None:
        with clock("table"):
            table = checks.finalize_part(to_table(users, top, scores, fb, out_vocab, model_version))
        with clock("check"):
            checks.check_part(table, users, indptr, cols, out_vocab, opts.top_n, model_version, extend_mask(mask, cold),
                              blocked)
        with clock("write"):
            writer.write_part(table, part=s, shard=s, **checks.user_range(users))
        nonlocal fallback_users
        with fallback_lock:
            fallback_users += int(fb.sum())

    scratch = contextlib.ExitStack()  # the spill folder, removed on the way out
    mask: np.ndarray | None = None
    exclusions: Exclusions | None = None
    avail_counts: dict[str, int] = {}
    try:
        if opts.availability is not None:  # a bad list fails here, before the events are read
            availability = load_availability(opts.availability, opts.date, vocab)
            mask = availability.mask
            stats |= availability.stats()
        if opts.exclusions is not None:  # likewise; held once, each shard takes its users' rows (load)
            exclusions = load_exclusions(opts.exclusions, opts.date, out_vocab)  # the day's new items too
            stats |= exclusions.stats()
            avail_counts["exclusions_users"] = 0
            if mask is None:  # with availability, its counts include the exclusions' backfills
                avail_counts |= {"exclusions_backfilled_users": 0, "exclusions_short_users": 0}
        tmp = scratch.enter_context(spill_dir())
        with clock("spill"):
            spill, counts = spill_events(dataset, opts, vocab, tmp)
        checks.check_shares(opts, counts["events"], counts["unknown_item_events"])  # before any scoring
        stats |= counts | {"shards": spill.n,
                           "user_sharding": {"scheme": scheme_for(spill.schema.field("user_id").type), "n_shards": spill.n}}
        hook("spilled")
        bar = Progress(opts.progress)
        # Leaving this block waits for the workers, so nothing is written after an abort below.
        with ThreadPoolExecutor(max_workers=2 * depth, thread_name_prefix="infer") as pool:
            loads: deque[Future[tuple[pa.Array, np.ndarray, np.ndarray, Blocked]]] = deque(
                pool.submit(load, s) for s in range(min(depth, spill.n)))
            parts: deque[Future[None]] = deque()
            try:
                for s in range(spill.n):
                    with clock("wait_histories"):
                        users, indptr, cols, blocked = loads.popleft().result()
                    if s + depth < spill.n:
                        loads.append(pool.submit(load, s + depth))
                    if len(users) == 0:
                        continue
                    if choice.guard:  # auto chose bf16: confirm it on this run's first users before using it
                        with clock("precision_guard"):
                            known = np.flatnonzero(np.diff(indptr) > 0)
                            hist = sp.csr_matrix((np.ones(len(cols), np.float32), cols, indptr),
                                                 shape=(len(indptr) - 1, bundle.n_items))[known]
                            choice = guard_bf16(choice, bundle, hist, opts.top_n, bs)
                    with clock("score"):
                        top, scores, fb = score_histories(bundle, indptr, cols, opts.top_n, bs, bar, choice.chosen,
                                                          mask, avail_counts, cold, blocked)
                    with clock("wait_publish"):
                        while len(parts) >= depth:
                            parts.popleft().result()  # at most `depth` parts in flight; an error surfaces here
                    parts.append(pool.submit(publish, s, users, indptr, cols, top, scores, fb, blocked))
                    del users, indptr, cols, top, scores, fb, blocked
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
        scratch.close()
    if cold is not None:
        avail_counts |= cold_stats(cold, avail_counts.pop("cold_users", 0))
        stats["cold_merge_seconds"] = round(avail_counts.pop("cold_merge_us", 0) / 1e6, 3)  # inside score_seconds
    return stats | avail_counts | {"precision": choice.chosen, "precision_reason": choice.reason,
                    "active_users": writer.rows, "fallback_users": fallback_users,
                    "score_seconds": round(clock.seconds.get("score", 0.0), 3), "phase_seconds": clock.rounded()}
