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

from pipeline.serving.availability import candidates, popular_available, restrict
from pipeline.serving.cold_items import ColdItems, merge_cold
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
                    cold: ColdItems | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-N columns and scores for users given as CSR rows over the model's columns, seen items removed.

    Returns ([U, k] int64 columns, [U, k] float32 scores, [U] bool fallback). Users with no known item get
    the popularity fallback. Seen items come back as -inf (only when fewer than k unseen items exist);
    `to_table` drops them.

    `available` ([n_items] bool, pipeline.serving.availability): only those columns are recommended, the model's
    first, then popular available unseen ones where fewer than N remain (-inf pads what stays empty); the
    numbers of backfilled and short users are added to `counts`. None: every column (unchanged output).

    `cold` (pipeline.serving.cold_items): the day's new items, columns n_items + j, merged into the lists after
    the availability restriction (they are all available) by that module's rule; `counts["cold_users"]` gets the
    users with a new item. Lists are then min(top_n, n_items + new items) wide (-inf padded).
    """
    import scipy.sparse as sp
    import torch

    n, n_items = len(indptr) - 1, bundle.n_items
    k = min(top_n, n_items)
    kw = k if cold is None else min(top_n, n_items + cold.n)  # list width with the new items
    top = np.zeros((n, kw), np.int64)
    scores = np.full((n, kw), -np.inf, np.float32)
    fallback = np.diff(indptr) == 0
    if available is None:
        fb_items, fb_scores = bundle.fallback(k)
    else:  # only available popular items; -inf pads a list the available catalog cannot fill
        pop, pop_scores = popular_available(bundle, available)
        fb_items = np.zeros(k, np.int64)
        fb_scores = np.full(k, -np.inf, np.float32)
        fb_items[:len(pop[:k])], fb_scores[:len(pop[:k])] = pop[:k], pop_scores[:k]
    top[fallback, :k], scores[fallback, :k] = fb_items, fb_scores
    cold_users, t_cold = 0, time.perf_counter()
    if cold is not None and fallback.any() and (scores[fallback] == -np.inf).any():  # short lists only
        top[fallback], scores[fallback], cold_users = merge_cold(top[fallback], scores[fallback], None, cold, n_items)
    cold_s = time.perf_counter() - t_cold
    if on_batch is not None and fallback.any():
        on_batch(int(fallback.sum()))
    known = np.flatnonzero(~fallback)
    if len(known):
        csr = sp.csr_matrix((np.ones(len(cols), np.float32), cols, indptr), shape=(n, n_items))
        csr.has_canonical_format = True  # shard_histories gives sorted, unique columns per row
        sub = csr[known] if len(known) < n else csr
        device = str(bundle.recommender.device)
        kk = k if available is None else candidates(k, n_items, available)
        if precision == "bf16" and torch.device(device).type == "cpu" and decoder_parts(bundle.recommender):
            t, s = recommend_bf16(bundle.recommender, sub, kk, batch_size=batch_size, on_batch=on_batch)
        else:
            with scoring_precision(precision, device):
                t, s = bundle.recommend(sub, kk, batch_size=batch_size, on_batch=on_batch)
        if available is not None:
            sub = sp.csr_matrix(sub)
            t, s, backfilled, short = restrict(t, s, k, available, pop, np.asarray(sub.indptr, np.int64),
                                               np.asarray(sub.indices, np.int64), top_n)
            if counts is not None:
                counts["availability_backfilled_users"] = counts.get("availability_backfilled_users", 0) + backfilled
                counts["availability_short_users"] = counts.get("availability_short_users", 0) + short
        if cold is not None:
            t_cold = time.perf_counter()
            pad = kw - t.shape[1]
            t = np.pad(t, ((0, 0), (0, pad)))
            s = np.pad(s, ((0, 0), (0, pad)), constant_values=-np.inf)
            t, s, with_cold = merge_cold(t, s, sp.csr_matrix(sub, dtype=np.float32), cold, n_items)
            cold_users += with_cold
            cold_s += time.perf_counter() - t_cold
        top[known], scores[known] = t, s
    if cold is not None and counts is not None:
        counts["cold_users"] = counts.get("cold_users", 0) + cold_users
        counts["cold_merge_us"] = counts.get("cold_merge_us", 0) + int(cold_s * 1e6)  # the cold items' share of scoring
    if available is not None and counts is not None:
        counts.setdefault("availability_backfilled_users", 0)
        short_fb = int(fallback.sum()) if (fb_scores == -np.inf).any() else 0  # fewer available items than N
        counts["availability_short_users"] = counts.get("availability_short_users", 0) + short_fb
    return top, scores, fallback


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
