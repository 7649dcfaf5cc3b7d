"""The output checks every part passes before it may be published, in both engines: one row per active
user, the fallback flag exactly where a user has no known item, one model version, N distinct unseen items
from the vocabulary (fewer only when the catalog is smaller), finite scores in descending order. A failure
raises OutputCheckError and nothing of the run is published. Also each part's user range for the manifest,
and `finalize_part`, the seam tests use to corrupt a part just before its checks.

`check_shares` checks the whole run: a run whose events mostly hold items the model does not know, or whose
users mostly get the popularity fallback, is refused rather than replacing a good partition of the date.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import DataError
from pipeline.serving.options import InferOptions
from pipeline.serving.scoring import OUTPUT_SCHEMA_FIELDS
from pipeline.serving.vocab import dense_lookup, map_items

CHECK_CHUNK_USERS = 16_384  # most users per chunk of the list checks
# The chunk's [users, n_items] int32 marks. At least 64 users: beyond 131k items they exceed this (256 MB at 1M
# items, where 64-user chunks check as fast as the key sort they replaced; 16-user chunks were 1.4x slower).
CHECK_MARK_BYTES = 32 << 20


class OutputCheckError(DataError):
    """A part failed an output check: the run is aborted and nothing is published."""

    def __init__(self, problem: str, fix: str = "nothing was published; fix the model or the job and re-run") -> None:
        super().__init__(f"output check failed: {problem}", fix)


def check_part(table: pa.Table, users: pa.Array, indptr: np.ndarray, cols: np.ndarray, vocab: pa.Array,
               top_n: int, model_version: str, available: np.ndarray | None = None,
               blocked: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    """Check a shard's output against its histories before it may be published (raises OutputCheckError).
    `available` (pipeline.serving.availability's mask): no list holds another item, and N counts only those.
    `blocked` (CSR parts over the history rows, pipeline.serving.exclusions, columns of `vocab`: the day's new
    items included): no list holds a user's excluded item, new or not, and N counts only the others."""
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
    blocked_keys = None
    if available is None and blocked is None:
        expected = np.minimum(top_n, n_items - seen)
    else:  # the user's seen (or excluded: counted once) items that are available, by history row
        allowed = available if available is not None else np.ones(n_items, bool)
        taken_rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
        taken_cols = np.asarray(cols, np.int64)
        if blocked is not None:
            blocked_keys = np.repeat(np.arange(len(indptr) - 1, dtype=np.int64), np.diff(blocked[0])) * n_items + blocked[1]
            keys = np.union1d(taken_rows.astype(np.int64) * n_items + taken_cols, blocked_keys)
            taken_rows, taken_cols = keys // n_items, keys % n_items
        seen_avail = np.bincount(taken_rows, weights=allowed[taken_cols], minlength=len(indptr) - 1).astype(np.int64)
        expected = np.minimum(top_n, int(allowed.sum()) - seen_avail[hrow])
    if not np.array_equal(lengths, expected):
        bad = int(np.flatnonzero(lengths != expected)[0])
        raise OutputCheckError(f"user {out_users[bad].as_py()} has {lengths[bad]} items, expected {expected[bad]} "
                               f"(N distinct unseen items, fewer only when the catalog is smaller)")
    if not np.array_equal(pc.list_value_length(scores).fill_null(-1).to_numpy(), lengths):
        raise OutputCheckError("scores and item_ids differ in length")
    c = map_items(items.flatten(), vocab, dense_lookup(vocab))
    if (c < 0).any():
        raise OutputCheckError("recommended items outside the model's vocabulary")
    if available is not None and not available[c].all():
        raise OutputCheckError("a recommended item is not in the date's availability list")
    if blocked_keys is not None and np.isin(np.repeat(hrow, lengths) * n_items + c, blocked_keys).any():
        raise OutputCheckError("a recommended item is on that user's exclusion list")
    _check_lists_against_histories(hrow, lengths, c, indptr, cols, n_items)
    s = scores.flatten().to_numpy(zero_copy_only=False)
    if not np.isfinite(s).all():
        raise OutputCheckError("non-finite scores")
    starts = np.zeros(len(s), bool)
    offs = np.cumsum(lengths)[:-1]
    starts[offs[offs < len(s)]] = True  # first entry of each list: no order across users
    if len(s) > 1 and np.any((np.diff(s) > 0) & ~starts[1:]):
        raise OutputCheckError("scores are not in descending order")


def check_shares(opts: InferOptions, events: int, unknown_item_events: int, users: int | None = None,
                 fallback_users: int | None = None) -> None:
    """The unknown-item share of the events and the fallback share of the users against the ceilings
    (opts.max_unknown_item_share, opts.max_fallback_share). The model's own baseline is 0 for both (its
    vocabulary is its training items, every training user had one), so shares far above it mean the events and
    the model do not belong together. Engines call it once the events are counted, the job again with the users."""
    fix = (f"the events' item ids do not match the model's vocabulary: check --events and --model (same catalog, "
           f"same id type) or retrain on current data; nothing was published (an earlier partition of {opts.date} "
           f"stays as it was)")
    if events and unknown_item_events / events > opts.max_unknown_item_share:
        raise OutputCheckError(f"{unknown_item_events / events:.1%} of the {events} events in the history window have "
                               f"items the model does not know (at most {opts.max_unknown_item_share:.1%} allowed, "
                               f"--max-unknown-item-share)", fix)
    if users and fallback_users is not None and fallback_users / users > opts.max_fallback_share:
        raise OutputCheckError(f"{fallback_users / users:.1%} of the {users} active users have no item the model knows "
                               f"and would all get the popularity fallback (at most {opts.max_fallback_share:.1%} "
                               f"allowed, --max-fallback-share)", fix)


def user_range(users: pa.Array) -> dict[str, Any]:
    """A part's smallest and largest user id, for its manifest entry (readers skip parts outside the range)."""
    lo_hi = pc.min_max(users)
    return {"user_min": lo_hi["min"].as_py(), "user_max": lo_hi["max"].as_py()}


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
    """The last step before a part is checked (a seam for tests that corrupt output). Engines call it as
    `checks.finalize_part`, so patching this module's attribute reaches both."""
    return table
