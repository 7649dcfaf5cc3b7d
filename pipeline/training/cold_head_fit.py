"""The weekly job's cold head (issue 29): fitted from the snapshot's item metadata, saved in the model bundle, so the
daily job can score titles that appear after training (pipeline.serving.cold_items) without a retrain.

Built only when the snapshot carries an item_metadata table (BuildMatrixJob.items) and TrainJob.cold_head is set.
A head that cannot be built (no usable metadata column, over the memory budget) is skipped with a warning and the
reason on the run: the model still serves its warm items, so a poor catalogue file must not stop the weekly job.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa

from model.cold_head import ColdHead, ColdHeadConfig, build_cold_head, default_blocks, pair_count

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


def head_bytes(n_items: int, n_blocks: int, cfg: ColdHeadConfig) -> int:
    """Peak memory of the fit: one dense [I, I] float32 similarity per regressor (μ by NNLS), or 8 I² for diag K."""
    regs = 0 if cfg.mu is not None else pair_count(n_blocks, cfg.second_order, cfg.max_pairs_blocks)
    return max(regs * 4, 8) * n_items * n_items


def fit_cold_head(rec: Any, snap: Any, cfg: ColdHeadConfig | None, max_bytes: int) -> tuple[ColdHead | None, dict[str, Any]]:
    """The head of a fitted recommender on `snap` (None when skipped) and what to log about it (`cold_head.*`)."""
    if cfg is None:
        return None, {"cold_head.status": "off"}
    meta = getattr(snap, "item_metadata", None)
    if meta is None:
        return None, {"cold_head.status": "skipped", "cold_head.reason": "snapshot built without items"}
    items = snapshot_items(meta, snap.n_items)
    blocks = list(cfg.blocks) if cfg.blocks else default_blocks(items.keys())
    need = head_bytes(snap.n_items, max(len(blocks), 1), cfg)
    if need > max_bytes:
        reason = (f"{snap.n_items} items x {len(blocks)} metadata blocks need {need / 2**30:.1f} GiB, over "
                  f"max_dense_bytes ({max_bytes / 2**30:.1f} GiB): pass cold_head.mu (fixed block weights) or raise it")
        log.warning("cold head skipped: %s", reason)
        return None, {"cold_head.status": "skipped", "cold_head.reason": reason}
    try:
        head = build_cold_head(rec, snap.train, items, cfg)
    except ValueError as e:  # no usable metadata: warm serving only, and the run says why
        log.warning("cold head skipped: %s", e)
        return None, {"cold_head.status": "skipped", "cold_head.reason": str(e)[:480]}
    with_meta = int(sum(any(items[b.name][i] not in (None, [], "") for b in head.blocks) for i in range(snap.n_items)))
    return head, {"cold_head.status": "built", "cold_head.kind": head.kind,
                  "cold_head.blocks": ",".join(b.name for b in head.blocks),
                  "cold_head.mu": ",".join(f"{m:.4g}" for m in head.mu), "cold_head.items_with_metadata": with_meta}
