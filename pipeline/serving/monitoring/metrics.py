"""The daily output's metrics as pure functions over numpy and Arrow arrays (no I/O), and `OutputAccumulator`, which
streams a date's lists through them batch by batch.

Memory stays bounded by the catalog, not the users: per item, its exposure (list slots) and its best rank (so
coverage@K for any K <= top_n comes from one pass); per user, nothing but a deterministic sample (`sample_users`
users chosen by the smallest values of a stable hash of the user id, pipeline.serving.sharding.user_hash) whose
lists give the score quantiles and the day-over-day overlap.

Definitions (n = the model's items, exposure e_i = list slots holding item i, S = sum of e_i):
- coverage@K: share of the n items at rank < K in at least one list;
- gini: the Gini coefficient of e over all n items (zeros included): 0 when every item is shown equally often,
  (n - 1) / n when one item takes every slot;
- top1pct_share: sum of the ceil(n / 100) largest e_i over S;
- overlap / jaccard (a user in both days' lists A, B): |A ∩ B| / max(|A|, |B|) and |A ∩ B| / |A ∪ B|, averaged;
- new_item_share: slots holding an item that had no slot in the previous date's lists, over S;
- exposure_shift: total variation distance between e / S and the previous date's exposure distribution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.serving.sharding import user_hash
from pipeline.serving.vocab import dense_lookup, map_items

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
COLUMNS = ("user_id", "item_ids", "scores", "fallback")
# The cold-start hook: a part that carries this column (list<bool>, aligned with item_ids: True where the slot's
# item is cold) gets `cold_item_share`; today no engine writes it, and the metric is then absent.
COLD_COLUMN = "cold"
NO_RANK = np.iinfo(np.int32).max


def gini(exposure: np.ndarray) -> float:
    """The Gini coefficient of non-negative counts (zeros included): 0 for equal counts, (n-1)/n for one
    non-zero count; 0 for no exposure at all."""
    x = np.sort(np.asarray(exposure, dtype=np.float64))
    n, total = len(x), float(x.sum())
    if n == 0 or total <= 0:
        return 0.0
    i = np.arange(1, n + 1, dtype=np.float64)
    return float(2.0 * np.dot(i, x) / (n * total) - (n + 1) / n)


def top_share(exposure: np.ndarray, fraction: float = 0.01) -> float:
    """Share of the total taken by the ceil(fraction * n) largest counts (at least one)."""
    x = np.asarray(exposure, dtype=np.float64)
    total = float(x.sum())
    if len(x) == 0 or total <= 0:
        return 0.0
    k = max(1, math.ceil(fraction * len(x)))
    return float(np.partition(x, len(x) - k)[len(x) - k:].sum() / total)


def lorenz(exposure: np.ndarray, points: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """The Lorenz curve of the counts (items from least to most exposed): x the share of items, y the share of
    exposure they hold, both from 0 to 1, at most `points` + 1 points (for the report's plot)."""
    x = np.sort(np.asarray(exposure, dtype=np.float64))
    n, total = len(x), float(x.sum())
    if n == 0 or total <= 0:
        return np.array([0.0, 1.0]), np.array([0.0, 1.0])
    cum = np.concatenate([[0.0], np.cumsum(x) / total])
    at = np.unique(np.linspace(0, n, min(points, n) + 1).round().astype(np.int64))
    return at / n, cum[at]


def coverage_at(first_rank: np.ndarray, k: int) -> float:
    """Share of items whose best rank (0-based, NO_RANK: never listed) is below k."""
    return float(np.count_nonzero(first_rank < k) / len(first_rank)) if len(first_rank) else 0.0


def quantiles(values: np.ndarray, qs: Sequence[float] = QUANTILES) -> dict[str, float] | None:
    """{'p01': ..., 'p50': ...} of the values; None when there are none."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return None
    return {f"p{round(q * 100):02d}": float(x) for q, x in zip(qs, np.quantile(v, qs), strict=True)}


def relative_change(current: float | None, previous: float | None) -> float | None:
    """(current - previous) / |previous|; None when either is missing, 0.0 when both are 0, inf when only the
    previous is 0."""
    if current is None or previous is None or not (math.isfinite(current) and math.isfinite(previous)):
        return None
    if previous == 0:
        return 0.0 if current == 0 else math.inf
    return (current - previous) / abs(previous)


def total_variation(p: np.ndarray, q: np.ndarray, q_outside: float = 0.0) -> float:
    """Total variation distance of two count vectors over the same items, each normalized to sum 1; `q_outside`:
    q's count on items p cannot hold (the previous model's items the current one lacks)."""
    ps, qs = float(p.sum()), float(q.sum()) + q_outside
    if ps <= 0 or qs <= 0:
        return 0.0 if ps <= 0 and qs <= 0 else 1.0
    return float(0.5 * (np.abs(p / ps - q / qs).sum() + q_outside / qs))


def list_lengths(lists: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return pc.list_value_length(lists).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)


def flat_values(lists: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The lists' values, slice-aware, as one array."""
    if isinstance(lists, pa.ChunkedArray):
        lists = lists.combine_chunks()
    return lists.flatten()


def list_overlap(today: pa.Table, previous: pa.Table) -> tuple[float, float, int] | None:
    """Mean overlap and mean Jaccard of the users present in both tables (columns user_id, item_ids), and how
    many there are; None when no user is in both."""
    if today.num_rows == 0 or previous.num_rows == 0:
        return None
    prev_users = previous.column("user_id")
    today_users = today.column("user_id")
    if prev_users.type != today_users.type:
        try:
            prev_users = prev_users.cast(today_users.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return None
    idx = pc.index_in(today_users, value_set=prev_users.combine_chunks())
    keep = idx.is_valid()
    t = today.filter(keep)
    if t.num_rows == 0:
        return None
    p = previous.take(idx.filter(keep))
    a, b = t.column("item_ids"), p.column("item_ids")
    if a.type != b.type:
        try:
            b = b.cast(a.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return 0.0, 0.0, t.num_rows  # the item ids of the two days share no type: nothing in common
    la, lb = list_lengths(a), list_lengths(b)
    fa, fb = flat_values(a), flat_values(b)
    codes = pc.dictionary_encode(pa.concat_arrays([fa, fb])).indices.to_numpy().astype(np.int64)
    width = int(codes.max()) + 1 if len(codes) else 1
    n = t.num_rows
    ka = np.repeat(np.arange(n, dtype=np.int64), la) * width + codes[:len(fa)]
    kb = np.repeat(np.arange(n, dtype=np.int64), lb) * width + codes[len(fa):]
    inter = np.bincount(ka[np.isin(ka, kb)] // width, minlength=n).astype(np.float64)
    longest = np.maximum(np.maximum(la, lb), 1)
    union = la + lb - inter
    jac = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    return float((inter / longest).mean()), float(jac.mean()), n


def sample_cut(rows: int, sample_users: int) -> np.uint64 | None:
    """The hash threshold that keeps about `sample_users` of `rows` users (10% more, trimmed exactly later);
    None: keep every user."""
    if rows <= sample_users:
        return None
    share = min(1.0, 1.1 * sample_users / rows)
    return np.uint64(min(int(share * 2.0**64), 2**64 - 1))


@dataclass
class OutputAccumulator:
    """A date's metrics, fed part by part (`add`): per-item exposure and best rank over the model's vocabulary,
    counts, streaming score moments, the cold hook, and the sampled users' rows. Memory: O(items + sample)."""

    vocab: pa.Array
    cut: np.uint64 | None = None  # sample_cut(rows, sample_users)
    sample_users: int = 10_000
    users: int = 0
    fallback_users: int = 0
    slots: int = 0
    unknown_slots: int = 0  # recommended ids outside the vocabulary (the output checks make this 0)
    cold_slots: int | None = None
    _lut: np.ndarray | None = field(default=None, repr=False)
    exposure: np.ndarray = field(init=False, repr=False)
    first_rank: np.ndarray = field(init=False, repr=False)
    _moments: dict[str, list[float]] = field(init=False, repr=False)
    _sample: list[pa.Table] = field(default_factory=list, repr=False)
    _sample_hash: list[np.ndarray] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self._lut = dense_lookup(self.vocab)
        self.exposure = np.zeros(len(self.vocab), np.int64)
        self.first_rank = np.full(len(self.vocab), NO_RANK, np.int32)
        self._moments = {k: [0.0, 0.0, math.inf, -math.inf] for k in ("model", "fallback")}  # n, sum, min, max

    def add(self, batch: pa.RecordBatch | pa.Table) -> None:
        """Take one batch of published rows (columns COLUMNS, optionally COLD_COLUMN)."""
        n = batch.num_rows
        if n == 0:
            return
        items = batch.column("item_ids")
        lengths = list_lengths(items)
        fb = batch.column("fallback").to_numpy(zero_copy_only=False).astype(bool)
        self.users += n
        self.fallback_users += int(fb.sum())
        total = int(lengths.sum())
        self.slots += total
        codes = map_items(flat_values(items), self.vocab, self._lut).astype(np.int64)
        full = len(lengths) > 0 and lengths.min() == lengths.max()  # the usual case: every list of the same length
        if full:
            ranks = np.tile(np.arange(int(lengths[0]), dtype=np.int32), n)
        else:
            ranks = (np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)).astype(np.int32)
        known = codes >= 0
        if not known.all():
            self.unknown_slots += int((~known).sum())
            codes, ranks = codes[known], ranks[known]
        self.exposure += np.bincount(codes, minlength=len(self.vocab))
        np.minimum.at(self.first_rank, codes, ranks)
        scores = flat_values(batch.column("scores")).to_numpy(zero_copy_only=False)
        slot_fb = np.repeat(fb, int(lengths[0])) if full else np.repeat(fb, lengths)
        for key, sel in (("model", ~slot_fb), ("fallback", slot_fb)):
            s = scores[sel]
            if len(s):
                m = self._moments[key]
                m[0] += len(s)
                m[1] += float(s.sum(dtype=np.float64))
                m[2] = min(m[2], float(s.min()))
                m[3] = max(m[3], float(s.max()))
        if COLD_COLUMN in batch.schema.names:  # the cold-start hook (module constant COLD_COLUMN)
            cold = flat_values(batch.column(COLD_COLUMN)).to_numpy(zero_copy_only=False)
            self.cold_slots = (self.cold_slots or 0) + int(np.count_nonzero(cold))
        users = batch.column("user_id")
        h = user_hash(users.combine_chunks() if isinstance(users, pa.ChunkedArray) else users)
        keep = np.ones(n, bool) if self.cut is None else h < self.cut
        if keep.any():
            rows = pa.table({c: batch.column(c) for c in COLUMNS}).filter(pa.array(keep))
            self._sample.append(rows)
            self._sample_hash.append(h[keep])

    def sample(self) -> pa.Table | None:
        """The sampled users' rows (COLUMNS): the `sample_users` smallest hashes, in hash order (deterministic);
        None when there were no rows."""
        if not self._sample:
            return None
        table = pa.concat_tables(self._sample)
        order = np.argsort(np.concatenate(self._sample_hash), kind="stable")[:self.sample_users]
        return table.take(pa.array(order))

    def moments(self, key: str) -> dict[str, float] | None:
        """count, mean, min, max of the `model` or `fallback` rows' scores (all rows, not the sample)."""
        n, total, lo, hi = self._moments[key]
        if n == 0:
            return None
        return {"count": n, "mean": total / n, "min": lo, "max": hi}


def score_values(sample: pa.Table | None, fallback: bool) -> np.ndarray:
    """The flat scores of the sample's model rows (fallback=False) or fallback rows."""
    if sample is None:
        return np.zeros(0, np.float64)
    rows = sample.filter(pc.equal(sample.column("fallback"), pa.scalar(fallback)))
    if rows.num_rows == 0:
        return np.zeros(0, np.float64)
    return flat_values(rows.column("scores")).to_numpy(zero_copy_only=False).astype(np.float64)


def previous_exposure(vocab: pa.Array, item_ids: pa.Array, counts: np.ndarray) -> tuple[np.ndarray, float]:
    """The previous date's exposure (item ids and counts) over this vocabulary, and its count on items outside it."""
    codes = map_items(item_ids, vocab, dense_lookup(vocab)).astype(np.int64)
    inside = codes >= 0
    q = np.zeros(len(vocab), np.float64)
    np.add.at(q, codes[inside], counts[inside].astype(np.float64))
    return q, float(counts[~inside].sum())


def summarize(acc: OutputAccumulator, top_n: int, sample: pa.Table | None) -> dict[str, Any]:
    """The scalar metrics of an accumulated date (those needing the previous date are added by the caller)."""
    model_q = quantiles(score_values(sample, False))
    fb_q = quantiles(score_values(sample, True))
    out: dict[str, Any] = {
        "users": acc.users,
        "fallback_rate": acc.fallback_users / acc.users if acc.users else 0.0,
        "coverage": coverage_at(acc.first_rank, top_n),
        "gini": gini(acc.exposure),
        "top1pct_share": top_share(acc.exposure, 0.01),
        "score_p05": model_q["p05"] if model_q else None,
        "score_p50": model_q["p50"] if model_q else None,
        "score_p95": model_q["p95"] if model_q else None,
        "fallback_score_p50": fb_q["p50"] if fb_q else None,
        "cold_item_share": (acc.cold_slots / acc.slots if acc.slots else 0.0) if acc.cold_slots is not None else None,
    }
    return out
