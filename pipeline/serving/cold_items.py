"""New titles at serving (issue 29): items of the day's items file that the model does not know are scored from
their metadata by the bundle's cold head (model.cold_head) and merged into the lists, with no retraining.

Which items: the day's items file (`--items URI`, default `<out>/items/dt=DATE` as `recsys ingest --format items`
publishes it), validated with the items contract (pipeline.io.items: a bad file is a DataError and nothing is
published); its ids outside the model's vocabulary are the new items; those not in the date's availability list
(when one is given) are dropped before anything is scored, so an unavailable new title is never shown.

Documented no-ops (warm lists exactly as without this module, the reason in the manifest's `cold_items_reason`):
`cold_slots` 0; no items file (a warning: a missing day's file must not stop the daily job); a model bundle
without a cold head ("model has no cold head"); no new item in the file; every new item unavailable.

Scores and the business rule. The new items are appended to the model's columns (column n_items + j is new item
j; the published vocabulary is extended the same way). A user's cold score of new item j is x_u · C[:, j]
(C = ColdHead.cold_columns: MARec's cold column for EASE models, the metadata similarity S_wj otherwise). At most
`cold_slots` new items per list, each only with a cold score > 0 (the user clicked something similar):
- linear heads (EASE/MARec: C is MARec's closed-form column, on the model's own score scale): the user's best
  `cold_slots` new items are merged with the model's list by score, as MARec itself would rank them;
- other heads (autoencoders; their scores are softmax logits, not comparable with x_u S): the new items take the
  last positions of the list (replacing the lowest-ranked model items), best cold score first, with scores just
  below the last model item kept (last − 1, last − 2, ...: their order, not their value, means something, as in
  pipeline.serving.availability's backfill). A new title then reaches every user with a similar history the day
  after it appears, without displacing the model's best items; its position is the price of an uncalibrated score.
Where a list cannot be filled from the model's items (a catalogue smaller than N plus the history), the remaining
new items fill it, in cold-score order: the output checks want N distinct unseen items whenever they exist.

Exclusions (pipeline.serving.exclusions) are resolved against the extended vocabulary, so a user's excluded new
item is one of that user's blocked columns (n_items + j): `merge_cold` never places it in that user's list (the
slot goes to the user's next best new item, or stays with the model's item, by the rules above), nor fills a
short list with it; the output checks refuse it like any excluded item.

Counts (manifest and InferResult): cold_items_new (in the file, unknown to the model), cold_items_unavailable,
cold_items_scored (scored: new and available), cold_items_shown (distinct new items in the published lists),
cold_users (users with at least one new item).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from pipeline.errors import DataError
from pipeline.io import lake
from pipeline.io.items import items_uri, read_items_uri
from pipeline.serving.availability import load_availability
from pipeline.serving.options import InferOptions
from pipeline.serving.vocab import dense_lookup, map_items

if TYPE_CHECKING:
    from pipeline.io.bundle import ModelBundle

log = logging.getLogger(__name__)


@dataclass
class ColdItems:
    """The day's scored new items: their ids (the model's id type), their columns C [n_items, n_new] float32, the
    merge rule (linear: by score) and the slots per list. `shown` marks the new items placed in some list so far."""

    ids: pa.Array
    columns: np.ndarray
    linear: bool
    slots: int
    shown: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.shown = np.zeros(len(self.ids), bool)

    @property
    def n(self) -> int:
        return len(self.ids)


def extend_vocab(vocab: pa.Array, cold: ColdItems | None) -> pa.Array:
    """The published vocabulary: the model's columns, then the new items."""
    return vocab if cold is None else pa.concat_arrays([vocab, cold.ids.cast(vocab.type)])


def extend_mask(mask: np.ndarray | None, cold: ColdItems | None) -> np.ndarray | None:
    """An availability mask over the extended vocabulary (the new items kept were all available)."""
    return mask if mask is None or cold is None else np.concatenate([mask, np.ones(cold.n, bool)])


def split_blocked(blocked: tuple[np.ndarray, np.ndarray], n_items: int
                  ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """A shard's excluded columns over the extended vocabulary (CSR parts) → (the model's columns, the new items'
    indices j = column - n_items), both CSR parts over the same rows, order kept."""
    indptr, cols = blocked
    n = len(indptr) - 1
    is_new = cols >= n_items
    if not is_new.any():
        return blocked, (np.zeros(n + 1, np.int64), np.zeros(0, np.int64))
    rows = np.repeat(np.arange(n), np.diff(indptr))

    def part(keep: np.ndarray) -> np.ndarray:
        out = np.zeros(n + 1, np.int64)
        np.cumsum(np.bincount(rows[keep], minlength=n), out=out[1:])
        return out

    return (part(~is_new), cols[~is_new]), (part(is_new), cols[is_new] - n_items)


def prepare_cold_items(opts: InferOptions, out: str | None, bundle: ModelBundle,
                       vocab: pa.Array) -> tuple[ColdItems | None, dict[str, Any]]:
    """The day's new items scored by the bundle's cold head, or None with the reason (see the module doc).
    DataError for a bad items file (nothing is published)."""
    t0 = time.perf_counter()
    stats: dict[str, Any] = {"cold_items_uri": None, "cold_items_new": 0, "cold_items_unavailable": 0,
                             "cold_items_scored": 0, "cold_items_reason": None}

    def none(reason: str) -> tuple[None, dict[str, Any]]:
        return None, stats | {"cold_items_reason": reason}

    if opts.cold_slots == 0:
        return none("cold_slots is 0 (cold items off)")
    uri = opts.items or (items_uri(out, opts.date) if out else None)
    if uri is None:
        return none("no items file given")
    stats["cold_items_uri"] = lake.resolve(uri).uri
    if not lake.resolve(uri).exists():
        log.warning("no items file at %s: new items are not scored today (warm items only)", stats["cold_items_uri"])
        return none(f"no items file at {stats['cold_items_uri']}: warm items only")
    head = bundle.cold_head
    if head is None:
        return none("model has no cold head")
    if head.n_items != bundle.n_items:
        raise DataError(f"the model's cold head covers {head.n_items} items, the model {bundle.n_items}",
                        "retrain the model (`recsys train`): its bundle is inconsistent")
    table = read_items_uri(uri)
    ids = table.column("item_id").combine_chunks()
    if ids.type != vocab.type and not (pa.types.is_integer(ids.type) and pa.types.is_integer(vocab.type)):
        raise DataError(f"items file {stats['cold_items_uri']} has item ids of type {ids.type}, the model's are "
                        f"{vocab.type}", "use the events' item ids in the items file (same catalog, same id type)")
    ids = ids.cast(vocab.type)
    new = np.flatnonzero(map_items(ids, vocab, dense_lookup(vocab)) < 0)
    stats["cold_items_new"] = len(new)
    if len(new) == 0:
        return none("no new items in the items file (every item is known to the model)")
    if opts.availability is not None:  # the list over model + new columns: unavailable new items are never scored
        ext = pa.concat_arrays([vocab, ids.take(pa.array(new))])
        avail = load_availability(opts.availability, opts.date, ext).mask[len(vocab):]
        stats["cold_items_unavailable"] = int((~avail).sum())
        new = new[avail]
        if len(new) == 0:
            return none("every new item is unavailable on the date")
    rows = table.take(pa.array(new))
    meta = {name: rows.column(name).to_pylist() for name in rows.column_names}
    weights = getattr(bundle.recommender, "weights", None) if head.kind == "marec" else None
    if head.kind == "marec" and (bundle.recommender.name != "ease" or weights is None):
        raise DataError(f"the cold head is MARec's (EASE backbone) but the model is {bundle.name}",
                        "retrain: the bundle's cold head and model do not belong together")
    columns = head.cold_columns(head.encode(meta, len(new)), weights)
    stats |= {"cold_items_scored": len(new), "cold_head": head.kind,
              "cold_prepare_seconds": round(time.perf_counter() - t0, 3)}
    return ColdItems(rows.column("item_id").combine_chunks(), np.ascontiguousarray(columns, np.float32), head.linear,
                     opts.cold_slots), stats


def merge_cold(top: np.ndarray, scores: np.ndarray, history: sp.csr_matrix | None, cold: ColdItems,
               n_items: int, blocked: tuple[np.ndarray, np.ndarray] | None = None
               ) -> tuple[np.ndarray, np.ndarray, int]:
    """Rows [m, K] of model columns (best first, -inf padding) → the same rows with new items merged by the
    module doc's rule (columns n_items + j); `history` [m, n_items] holds the rows' clicks (None: fallback rows,
    which get new items only where their list is short). `blocked` (CSR parts over the rows, new-item indices j):
    each row's excluded new items, never merged into that row (its next new item or the model's item takes the
    slot). Returns (top, scores, users with a new item)."""
    m, k = top.shape
    top, scores = top.copy(), scores.copy()
    used = np.zeros((m, cold.n), bool)
    if blocked is not None and len(blocked[1]) == 0:
        blocked = None
    raw = None if history is None else np.asarray(history @ cold.columns, dtype=np.float32)  # [m, n_new]
    if raw is not None and m and cold.n:
        sc = np.where(raw > 0, raw, np.float32(-np.inf))  # only users who clicked something similar
        if blocked is not None:  # an excluded new item scores like one the user has no similar click for
            sc[np.repeat(np.arange(m), np.diff(blocked[0])), blocked[1]] = -np.inf
        c = min(cold.slots, cold.n, k)
        part = np.argpartition(-sc, c - 1, axis=1)[:, :c] if c < cold.n else np.tile(np.arange(cold.n), (m, 1))
        cv = np.take_along_axis(sc, part, 1)
        order = np.argsort(-cv, axis=1, kind="stable")
        part, cv = np.take_along_axis(part, order, 1), np.take_along_axis(cv, order, 1)
        rows = np.flatnonzero(cv[:, 0] > -np.inf)
        if len(rows):
            ct, cs = part[rows] + n_items, cv[rows]
            t, s = top[rows], scores[rows]
            if cold.linear:  # MARec's own ranking of warm and cold items, at most `slots` cold ones
                t, s = _merge_sorted(t, s, ct, cs)
            else:  # the last positions of the list, after the model's best items
                npos = (cs > -np.inf).sum(1)
                have = (s > -np.inf).sum(1)
                start = np.minimum(have, k - npos)
                base = np.where(start > 0, s[np.arange(len(rows)), np.maximum(start - 1, 0)], 0.0)
                s[np.arange(k)[None, :] >= start[:, None]] = -np.inf
                j = np.arange(c)[None, :]
                put = j < npos[:, None]
                r_idx = np.broadcast_to(np.arange(len(rows))[:, None], put.shape)[put]
                pos = (start[:, None] + j)[put]
                t[r_idx, pos] = ct[put]
                s[r_idx, pos] = (base[:, None] - (j + 1))[put]
            top[rows], scores[rows] = t, s
    _fill_short(top, scores, cold, n_items, raw, blocked)
    is_cold = (top >= n_items) & (scores > -np.inf)
    cols = top[is_cold] - n_items
    used[np.nonzero(is_cold)[0], cols] = True
    cold.shown |= used.any(axis=0)
    return top, scores, int(is_cold.any(axis=1).sum())


def _merge_sorted(t: np.ndarray, s: np.ndarray, ct: np.ndarray, cs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two descending lists per row ([r, k] model, [r, c] cold; -inf = none) merged, the first k kept; a tie goes
    to the model's item. c comparisons per slot instead of a sort (c is 1-3, k 100): model item i lands at
    i + (cold items ahead of it), cold item j at (model items ahead of it) + j, a permutation of 0..k+c-1."""
    r, k = t.shape
    c = ct.shape[1]
    ar = np.arange(k, dtype=np.int32)
    pos = np.stack([(s >= cs[:, [j]]).sum(1, dtype=np.int32) for j in range(c)], 1)  # model items ahead of cold j
    dest = np.broadcast_to(ar, (r, k)).copy()
    for j in range(c):
        dest += ar[None, :] >= pos[:, [j]]  # in place: no [r, k] int64 temporaries (memory-bound on big shards)
    cdest = pos + np.arange(c, dtype=np.int32)[None, :]
    out_t = np.empty((r, k + c), t.dtype)
    out_s = np.empty((r, k + c), s.dtype)
    np.put_along_axis(out_t, dest, t, 1)
    np.put_along_axis(out_s, dest, s, 1)
    np.put_along_axis(out_t, cdest, ct.astype(t.dtype), 1)
    np.put_along_axis(out_s, cdest, cs, 1)
    return out_t[:, :k], out_s[:, :k]


def _fill_short(top: np.ndarray, scores: np.ndarray, cold: ColdItems, n_items: int, sc: np.ndarray | None,
                blocked: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    """Lists with -inf padding (the model's unseen items ran out) get the remaining new items, best cold score
    first, except the row's `blocked` (excluded) ones."""
    short = np.flatnonzero((scores == -np.inf).any(axis=1))
    for r in short:
        have = int((scores[r] > -np.inf).sum())
        valid = scores[r] > -np.inf
        t, s = top[r][valid], scores[r][valid]
        placed = set((t[t >= n_items] - n_items).tolist())
        if blocked is not None:
            placed.update(blocked[1][blocked[0][r]:blocked[0][r + 1]].tolist())
        order = np.argsort(-sc[r], kind="stable") if sc is not None else np.arange(cold.n)
        extra = [int(j) for j in order if int(j) not in placed][: len(top[r]) - have]
        if not extra:
            continue
        base = float(s[-1]) if have else 0.0
        top[r, :have], scores[r, :have] = t, s
        top[r, have:have + len(extra)] = np.asarray(extra, np.int64) + n_items
        scores[r, have:have + len(extra)] = base - np.arange(1, len(extra) + 1, dtype=np.float32)
        scores[r, have + len(extra):] = -np.inf


def cold_stats(cold: ColdItems | None, users: int) -> dict[str, int]:
    """The run's counts of shown new items (see the module doc)."""
    return {"cold_items_shown": 0 if cold is None else int(cold.shown.sum()), "cold_users": users}


