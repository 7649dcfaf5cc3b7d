"""Scoring a registered bundle on a snapshot's test users, the way the gate compares candidate and champion.

Both are scored on the CANDIDATE's snapshot (strong generalization: fold-in → targets), so they are compared on
the same users. A champion trained on another snapshot may know other items: see `_score_fn`.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _score_fn(bundle: Any, item_ids: np.ndarray) -> tuple[Any, bool]:
    """The bundle's score function over the snapshot's item columns (a champion may know other items:
    unknown fold-in items are dropped, items it cannot score get -inf, so it is never credited for them).
    Returns (score function, whether columns were remapped)."""
    import torch

    from model.sparse import SparseBatch

    rec = bundle.recommender
    if len(bundle.item_ids) == len(item_ids) and np.array_equal(bundle.item_ids.astype(str), item_ids.astype(str)):
        return rec.score, False
    index = bundle.item_index()
    s2b = torch.tensor([index.get(i, -1) for i in item_ids.tolist()], dtype=torch.int64)
    known = torch.nonzero(s2b >= 0).squeeze(1)

    def score(hist: SparseBatch) -> torch.Tensor:
        dev = hist.cols.device
        c = s2b.to(dev)[hist.cols]
        keep = c >= 0
        rows = hist.rows[keep]
        offsets = torch.searchsorted(rows, torch.arange(hist.n_rows, device=dev))
        b = SparseBatch(rows, c[keep], hist.vals[keep], offsets, hist.n_rows, bundle.n_items)
        out = rec.score(b).float()
        full = torch.full((hist.n_rows, len(item_ids)), -torch.inf, device=out.device)
        full[:, known.to(out.device)] = out[:, s2b[known].to(out.device)]
        return full

    return score, True


def rescore(bundle: Any, snap: Any, top_n: int) -> tuple[dict[str, float], int]:
    """Mean test metrics of a bundle on a snapshot's test users, and the number of users with non-finite scores."""
    import torch

    from model.evaluate import evaluate

    base, remapped = _score_fn(bundle, snap.item_ids)
    bad = [0]

    def counting(hist: Any) -> torch.Tensor:
        s = base(hist)
        ok = torch.isfinite(s) | torch.isneginf(s) if remapped else torch.isfinite(s)  # remapped: -inf = unknown item
        bad[0] += int((~ok.all(dim=1)).sum())
        return s

    res = evaluate(counting, snap.test.fold_in, snap.test.targets, device=bundle.recommender.device, coverage_k=top_n,
                   item_popularity=torch.as_tensor(snap.item_popularity()))
    out = res.mean()
    out[f"mean_popularity@{top_n}"] = res.mean_popularity
    return out, bad[0]


def seen_in_top(bundle: Any, snap: Any, k: int, max_users: int) -> int:
    """Already-seen (fold-in) items in the bundle's top-k lists, through the same recommend() inference uses."""
    x = snap.test.fold_in[:max_users]
    top, _ = bundle.recommend(x, k)
    rows = np.repeat(np.arange(top.shape[0]), top.shape[1])
    return int(np.asarray(x[rows, top.ravel()]).sum())
