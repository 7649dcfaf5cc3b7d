"""Scoring shared by both engines: CSR histories → each user's top-N unseen columns and scores (the popularity
fallback for users without a known item), at the chosen matmul precision (pipeline.serving.precision), and the
result as the published table (user_id, item_ids, scores, model_version, fallback). The model runs on whatever
device its bundle is on.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from pipeline.serving import availability
from pipeline.serving.availability import candidates, popular_available, restrict
from pipeline.serving.cold_items import ColdItems, merge_cold, split_blocked
from pipeline.serving.precision import decoder_parts, recommend_bf16

if TYPE_CHECKING:
    from pipeline.io.bundle import ModelBundle

OUTPUT_SCHEMA_FIELDS = ("user_id", "item_ids", "scores", "model_version", "fallback")


@contextlib.contextmanager
def scoring_precision(precision: str, device: str) -> Iterator[str]:
    """Precision of the scoring matmuls; yields the one in effect.

    fp32: exact. tf32 (CUDA only; the CPU stays fp32): matmuls on tensor cores with fp32 storage and
    accumulation, ~10-bit mantissa inputs; scores and top-k are still fp32. bf16 on CUDA: autocast (half the
    memory traffic; scores rounded to bf16 before the top-k, so more near-ties). bf16 on the CPU does not use
    this context: `score_histories` takes pipeline.serving.precision.recommend_bf16 (bf16 candidates, fp32
    re-score). "auto" here is the choice without a capability check (tf32 on CUDA, fp32 on the CPU): engines
    that decide by capability pass the chosen precision (pipeline.serving.precision.choose_precision).
    Any precision passes the output checks: they hold for the scores the model produced, whatever their rounding.
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


def precision_in_effect(precision: str, device: str) -> str:
    """The precision `scoring_precision(precision, device)` would use (what the manifest records)."""
    with scoring_precision(precision, device) as chosen:
        return chosen


def score_histories(bundle: ModelBundle, indptr: np.ndarray, cols: np.ndarray, top_n: int, batch_size: int,
                    on_batch: Callable[[int], None] | None = None,
                    precision: str = "fp32", available: np.ndarray | None = None,
                    counts: dict[str, int] | None = None,
                    cold: ColdItems | None = None,
                    blocked: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-N columns and scores for users given as CSR rows over the model's columns, seen items removed.

    Returns ([U, k] int64 columns, [U, k] float32 scores, [U] bool fallback). Users with no known item get
    the popularity fallback. Seen items come back as -inf (only when fewer than k unseen items exist);
    `to_table` drops them.

    `available` ([n_items] bool, pipeline.serving.availability): only those columns are recommended, the model's
    first, then popular available unseen ones where fewer than N remain (-inf pads what stays empty); the
    numbers of backfilled and short users are added to `counts`. None: every column (unchanged output).

    `blocked` (CSR parts over the same rows, pipeline.serving.exclusions.Exclusions.for_users): each user's
    excluded columns, removed from the model's items and never backfilled nor in the user's fallback list. The
    model ranks the largest row's exclusion count more candidates (at most OVERFETCH * k), so a user whose
    excluded items sit in the top k still gets model items before popular ones. Backfilled and short users go
    to counts["exclusions_backfilled_users"/"exclusions_short_users"] (short: users with an exclusion left with
    fewer than N items), or to the availability ones when `available` is given too (one restriction, one
    count); counts["exclusions_users"]: rows with an exclusion.

    `cold` (pipeline.serving.cold_items): the day's new items, columns n_items + j, merged into the lists after
    the availability restriction (they are all available) by that module's rule; `counts["cold_users"]` gets the
    users with a new item. Lists are then min(top_n, n_items + new items) wide (-inf padded). `blocked` may then
    name new items too (columns n_items + j, exclusions resolved against the extended vocabulary): those go to
    the merge only (the user's excluded new items are never merged), the model's columns to the restriction.
    """
    import scipy.sparse as sp
    import torch

    n, n_items = len(indptr) - 1, bundle.n_items
    k = min(top_n, n_items)
    kw = k if cold is None else min(top_n, n_items + cold.n)  # list width with the new items
    top = np.zeros((n, kw), np.int64)
    scores = np.full((n, kw), -np.inf, np.float32)
    fallback = np.diff(indptr) == 0
    if blocked is not None and counts is not None:
        counts["exclusions_users"] = counts.get("exclusions_users", 0) + int((np.diff(blocked[0]) > 0).sum())
    cold_blocked = None  # the rows' excluded new items (indices j), for merge_cold
    if blocked is not None and cold is not None:
        blocked, cold_blocked = split_blocked(blocked, n_items)
        if len(cold_blocked[1]) == 0:
            cold_blocked = None
    if blocked is not None and len(blocked[1]) == 0:
        blocked = None  # nobody in these rows excluded a model item: exactly the model's output without a list
    restricting = available is not None or blocked is not None
    mask = available if available is not None else np.ones(n_items, bool)
    prefix = "availability" if available is not None else "exclusions"
    if not restricting:
        fb_items, fb_scores = bundle.fallback(k)
    else:  # only available popular items; -inf pads a list the available catalog cannot fill
        pop, pop_scores = popular_available(bundle, mask)
        fb_items = np.zeros(k, np.int64)
        fb_scores = np.full(k, -np.inf, np.float32)
        fb_items[:len(pop[:k])], fb_scores[:len(pop[:k])] = pop[:k], pop_scores[:k]
    top[fallback, :k], scores[fallback, :k] = fb_items, fb_scores
    short_fb = 0
    if restricting and fallback.any():
        fb_rows = np.flatnonzero(fallback)
        fb_blocked = None if blocked is None else take_rows(blocked, fb_rows)
        if fb_blocked is not None and len(fb_blocked[1]):  # their popular list without their excluded items
            top[fb_rows, :k], scores[fb_rows, :k] = popular_unblocked(pop, pop_scores, k, fb_blocked, n_items)
        short_rows = (scores[fb_rows, :k] == -np.inf).any(axis=1)  # fewer allowed items than N
        if available is None:  # exclusions alone: only their users can be short because of them
            short_rows &= (np.diff(fb_blocked[0]) > 0) if fb_blocked is not None else np.zeros(len(fb_rows), bool)
        short_fb = int(short_rows.sum())
    cold_users, t_cold = 0, time.perf_counter()
    if cold is not None and fallback.any() and (scores[fallback] == -np.inf).any():  # short lists only
        fb_cold_blocked = None if cold_blocked is None else take_rows(cold_blocked, np.flatnonzero(fallback))
        top[fallback], scores[fallback], cold_users = merge_cold(top[fallback], scores[fallback], None, cold, n_items,
                                                                 fb_cold_blocked)
    cold_s = time.perf_counter() - t_cold
    if on_batch is not None and fallback.any():
        on_batch(int(fallback.sum()))
    known = np.flatnonzero(~fallback)
    if len(known):
        csr = sp.csr_matrix((np.ones(len(cols), np.float32), cols, indptr), shape=(n, n_items))
        csr.has_canonical_format = True  # shard_histories gives sorted, unique columns per row
        sub = csr[known] if len(known) < n else csr
        device = str(bundle.recommender.device)
        sub_blocked = None if blocked is None else take_rows(blocked, known)
        if sub_blocked is not None and len(sub_blocked[1]) == 0:
            sub_blocked = None
        restrict_known = available is not None or sub_blocked is not None
        kk = k if not restrict_known else candidates(k, n_items, mask)
        if sub_blocked is not None:  # room for the shard's longest exclusion list, capped: [users, kk] per shard
            kk = min(n_items, kk + min(int(np.diff(sub_blocked[0]).max()), availability.OVERFETCH * k))
        if precision == "bf16" and torch.device(device).type == "cpu" and decoder_parts(bundle.recommender):
            t, s = recommend_bf16(bundle.recommender, sub, kk, batch_size=batch_size, on_batch=on_batch)
        else:
            with scoring_precision(precision, device):
                t, s = bundle.recommend(sub, kk, batch_size=batch_size, on_batch=on_batch)
        if restrict_known:
            sub = sp.csr_matrix(sub)
            seen = (np.asarray(sub.indptr, np.int64), np.asarray(sub.indices, np.int64))
            if sub_blocked is None:
                t, s, backfilled, short = restrict(t, s, k, mask, pop, *seen, top_n)
            else:  # restrict's per-user exclusion path costs ~50 us a row: only the rows with an exclusion take it
                has = np.diff(sub_blocked[0]) > 0
                rows_b, rows_n = np.flatnonzero(has), np.flatnonzero(~has)
                out_t, out_s = np.empty((len(t), k), np.int64), np.empty((len(t), k), np.float32)
                out_t[rows_b], out_s[rows_b], backfilled, short = restrict(
                    t[rows_b], s[rows_b], k, mask, pop, *take_rows(seen, rows_b), top_n,
                    blocked=take_rows(sub_blocked, rows_b))
                if available is not None:
                    out_t[rows_n], out_s[rows_n], b_n, s_n = restrict(t[rows_n], s[rows_n], k, mask, pop,
                                                                      *take_rows(seen, rows_n), top_n)
                    backfilled, short = backfilled + b_n, short + s_n
                else:  # nothing removed: the model's first k, as without a list (short counts users with one)
                    out_t[rows_n], out_s[rows_n] = t[rows_n, :k], s[rows_n, :k]
                t, s = out_t, out_s
            if counts is not None:
                counts[f"{prefix}_backfilled_users"] = counts.get(f"{prefix}_backfilled_users", 0) + backfilled
                counts[f"{prefix}_short_users"] = counts.get(f"{prefix}_short_users", 0) + short
        if cold is not None:
            t_cold = time.perf_counter()
            pad = kw - t.shape[1]
            t = np.pad(t, ((0, 0), (0, pad)))
            s = np.pad(s, ((0, 0), (0, pad)), constant_values=-np.inf)
            t, s, with_cold = merge_cold(t, s, sp.csr_matrix(sub, dtype=np.float32), cold, n_items,
                                         None if cold_blocked is None else take_rows(cold_blocked, known))
            cold_users += with_cold
            cold_s += time.perf_counter() - t_cold
        top[known], scores[known] = t, s
    if cold is not None and counts is not None:
        counts["cold_users"] = counts.get("cold_users", 0) + cold_users
        counts["cold_merge_us"] = counts.get("cold_merge_us", 0) + int(cold_s * 1e6)  # the cold items' share of scoring
    if restricting and counts is not None:
        counts.setdefault(f"{prefix}_backfilled_users", 0)
        counts[f"{prefix}_short_users"] = counts.get(f"{prefix}_short_users", 0) + short_fb
    return top, scores, fallback


def take_rows(csr: tuple[np.ndarray, np.ndarray], rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CSR parts (indptr, cols) of the given rows, in that order."""
    indptr, cols = csr
    if len(rows) == len(indptr) - 1 and np.array_equal(rows, np.arange(len(rows))):
        return indptr, cols
    lengths = np.diff(indptr)[rows]
    out = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(lengths, out=out[1:])
    idx = np.repeat(indptr[rows] - out[:-1], lengths) + np.arange(out[-1])
    return out, cols[idx]


def popular_unblocked(pop: np.ndarray, pop_scores: np.ndarray, k: int, blocked: tuple[np.ndarray, np.ndarray],
                      n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """The fallback lists [m, k] of m users: `pop` (allowed columns, most popular first) without each user's
    blocked columns, with their popularity scores; -inf pads what the catalog cannot fill."""
    indptr, cols = blocked
    m = len(indptr) - 1
    w = min(len(pop), k + int(np.diff(indptr).max(initial=0)))  # k unblocked ones are among the first k + most blocked
    t = np.tile(pop[:w], (m, 1))
    s = np.tile(pop_scores[:w].astype(np.float32), (m, 1))
    row_keys = np.arange(m, dtype=np.int64)[:, None] * n_items
    hit = np.isin(row_keys + t, np.repeat(row_keys[:, 0], np.diff(indptr)) + cols)
    s[hit] = -np.inf
    order = np.argsort(hit, axis=1, kind="stable")[:, :k]
    t, s = np.take_along_axis(t, order, 1), np.take_along_axis(s, order, 1)
    if t.shape[1] < k:
        t = np.pad(t, ((0, 0), (0, k - t.shape[1])))
        s = np.pad(s, ((0, 0), (0, k - s.shape[1])), constant_values=-np.inf)
    return t, s


def to_table(users: pa.Array, top: np.ndarray, scores: np.ndarray, fallback: np.ndarray, vocab: pa.Array,
             model_version: str) -> pa.Table:
    """Scored rows → the published table (OUTPUT_SCHEMA_FIELDS): columns become item ids through `vocab`, and
    the -inf entries (seen items padded in when the catalog is nearly exhausted) are dropped from the lists."""
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
