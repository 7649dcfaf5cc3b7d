"""The weekly job's cold head (issue 29): fitted from the snapshot's item metadata, saved in the model bundle, so the
daily job can score titles that appear after training (pipeline.serving.cold_items) without a retrain.

Built only when the snapshot carries an item_metadata table (BuildMatrixJob.items) and TrainJob.cold_head is set.
A head that cannot be built (no usable metadata column, over the memory budget) is skipped with a warning and the
reason on the run: the model still serves its warm items, so a poor catalogue file must not stop the weekly job.

`fit_alignment` builds MARec's alignment target for a Multi-VAE/DAE (TrainJob.marec_align, model.marec) from the
same features and block weights: its aligned columns are the snapshot's cold items that have a model column (no
training click: their only clicks are held-out users'), so the decoder learns them from their metadata. Titles
with no click at all have no column; the cold head scores those at serving.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa

from model.cold_head import LINEAR_FAMILIES, ColdHead, ColdHeadConfig, MetadataOnly, build_cold_head, default_blocks, pair_count
from model.cold_head_tuning import tune_cold_head
from model.marec import AlignmentTarget

log = logging.getLogger(__name__)

SNAPSHOT_COLUMNS = ("item_id", "item_idx", "cold")  # the join's own columns, not metadata


def snapshot_items(meta: pa.Table, n_items: int) -> dict[str, list[Any]]:
    """Column → one value per model column (column order); a column without metadata gets None."""
    idx = meta.column("item_idx").to_numpy(zero_copy_only=False)
    keep = ~np.isnan(idx.astype(np.float64)) if idx.dtype.kind == "f" else np.ones(len(idx), bool)
    rows, cols = np.flatnonzero(keep), idx[keep].astype(np.int64)
    out: dict[str, list[Any]] = {}
    for name in meta.column_names:
        if name in SNAPSHOT_COLUMNS:
            continue
        values = meta.column(name).to_pylist()
        col: list[Any] = [None] * n_items
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            col[c] = values[r]
        out[name] = col
    return out


def head_bytes(n_items: int, n_blocks: int, cfg: ColdHeadConfig, linear: bool = False) -> int:
    """Peak memory of the fit: one dense [I, I] float32 similarity per regressor (μ by NNLS), or 8 I² for diag K;
    tuning a linear family's head adds the remaining clicks' K (4 I²)."""
    regs = 0 if cfg.mu is not None else pair_count(n_blocks, cfg.second_order, cfg.max_pairs_blocks)
    return (max(regs * 4, 8) + (4 if cfg.tune is not None and linear else 0)) * n_items * n_items


def fit_cold_head(rec: Any, snap: Any, cfg: ColdHeadConfig | None, max_bytes: int,
                  prebuilt: ColdHead | None = None) -> tuple[ColdHead | None, dict[str, Any]]:
    """The head of a fitted recommender on `snap` (None when skipped) and what to log about it (`cold_head.*`).
    `prebuilt`: the eq5 head fit_alignment built from the same snapshot and `cfg`, reused for a model that takes an
    eq5 head (its fit does not depend on the model) instead of being fitted twice."""
    if cfg is None:
        return None, {"cold_head.status": "off"}
    meta = getattr(snap, "item_metadata", None)
    if meta is None:
        return None, {"cold_head.status": "skipped", "cold_head.reason": "snapshot built without items"}
    items = snapshot_items(meta, snap.n_items)
    blocks = list(cfg.blocks) if cfg.blocks else default_blocks(items.keys())
    need = head_bytes(snap.n_items, max(len(blocks), 1), cfg, getattr(rec, "name", "") in LINEAR_FAMILIES)
    if need > max_bytes:
        reason = (f"{snap.n_items} items x {len(blocks)} metadata blocks need {need / 2**30:.1f} GiB, over "
                  f"max_dense_bytes ({max_bytes / 2**30:.1f} GiB): pass cold_head.mu (fixed block weights) or raise it")
        log.warning("cold head skipped: %s", reason)
        return None, {"cold_head.status": "skipped", "cold_head.reason": reason}
    reuse = prebuilt is not None and prebuilt.kind == "eq5" and getattr(rec, "name", "") not in LINEAR_FAMILIES
    tuned: dict[str, Any] = {}
    if cfg.tune is not None and not reuse:
        cfg, tuned = _tuned(rec, snap, items, cfg)
    try:
        head = prebuilt if reuse and prebuilt is not None else build_cold_head(rec, snap.train, items, cfg)
    except ValueError as e:  # no usable metadata: warm serving only, and the run says why
        log.warning("cold head skipped: %s", e)
        return None, {"cold_head.status": "skipped", "cold_head.reason": str(e)[:480]}
    with_meta = int(sum(any(items[b.name][i] not in (None, [], "") for b in head.blocks) for i in range(snap.n_items)))
    return head, {"cold_head.status": "built", "cold_head.kind": head.kind,
                  "cold_head.blocks": ",".join(b.name for b in head.blocks), "cold_head.neighbours": head.neighbours,
                  "cold_head.mu": ",".join(f"{m:.4g}" for m in head.mu), "cold_head.items_with_metadata": with_meta,
                  "cold_head.delta": head.delta, **tuned}


def _tuned(rec: Any, snap: Any, items: dict[str, list[Any]], cfg: ColdHeadConfig) -> tuple[ColdHeadConfig, dict[str, Any]]:
    """cfg with δ and neighbours chosen on pseudo-cold titles (model.cold_head_tuning), and what to log; cfg as
    given (and the reason) when there is too little to tune on: the head is still built."""
    assert cfg.tune is not None
    linear = getattr(rec, "name", "") in LINEAR_FAMILIES
    l2 = float(cfg.l2 if cfg.l2 is not None else getattr(getattr(rec, "config", None), "l2", 0.0) or 0.0)
    try:
        t = tune_cold_head(snap.train, items, cfg, cfg.tune, l2 if linear and l2 > 0 else None)
    except ValueError as e:
        log.warning("cold head not tuned (configured delta and neighbours kept): %s", e)
        return cfg, {"cold_head.tuned": "no", "cold_head.tune_reason": str(e)[:480]}
    log.info("cold head tuned on held-out titles: %s", t.summary())
    grid = ";".join(f"{r['delta']:g}/{r['neighbours']}={r['ndcg']:.4f}" for r in t.rows)
    return cfg.model_copy(update={"delta": t.delta, "neighbours": t.neighbours}), {
        "cold_head.tuned": t.summary(), "cold_head.tune_grid": grid[:480]}


def cold_model_columns(meta: pa.Table) -> np.ndarray:
    """Model columns (item_idx) of the items the snapshot flags cold, ascending."""
    idx = meta.column("item_idx").to_numpy(zero_copy_only=False).astype(np.float64)
    cold = np.asarray(meta.column("cold").to_pylist(), dtype=bool)
    return np.unique(idx[cold & ~np.isnan(idx)].astype(np.int64))


def fit_alignment(snap: Any, cfg: ColdHeadConfig | None, ab: float,
                  max_bytes: int) -> tuple[AlignmentTarget | None, dict[str, Any], ColdHead | None]:
    """MARec's alignment target over the snapshot's cold model columns (αβ = `ab`), what to log about it
    (`marec_align.*`) and the eq5 head it was computed from (for fit_cold_head's `prebuilt`); (None, the reason,
    None) when off or there is nothing to align: the model then trains without."""
    if ab <= 0:
        return None, {"marec_align.status": "off"}, None
    meta = getattr(snap, "item_metadata", None)

    def skipped(reason: str) -> tuple[None, dict[str, Any], None]:
        log.warning("MARec alignment skipped: %s", reason)
        return None, {"marec_align.status": "skipped", "marec_align.reason": reason[:480]}, None

    if meta is None:
        return skipped("snapshot built without items")
    cold = cold_model_columns(meta)
    if not len(cold):
        return skipped("no cold item has a model column in this snapshot (new titles are scored by the cold head)")
    head, info = fit_cold_head(MetadataOnly(), snap, cfg or ColdHeadConfig(), max_bytes)
    if head is None:
        return skipped(info.get("cold_head.reason", "no cold head"))
    rows = [r[cold] for r in head.warm_rows]  # the cold columns' feature rows, per block
    s_cols = head.similarity(rows, exclude=cold)  # S[:, cold]; cold titles are not each other's neighbours
    with_meta = int(np.count_nonzero(sum(r.getnnz(axis=1) for r in rows)))
    tuned = {k: v for k, v in info.items() if k.startswith("cold_head.tune")}  # logged even when the head is reused
    return AlignmentTarget(cold, s_cols, alpha=ab), tuned | {
        "marec_align.status": "built", "marec_align.cold_items": len(cold),
        "marec_align.cold_items_with_metadata": with_meta, "marec_align.ab": float(ab)}, head
