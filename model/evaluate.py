"""Scoring held-out users under the strong-generalization protocol: rank every item except the
user's fold-in items, compare the top of the ranking with the held-out targets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from model.metrics import coverage_at_k, ranking_metrics, topk_items
from model.sparse import DeviceCSR, SparseBatch

ScoreFn = Callable[[SparseBatch], torch.Tensor]


@dataclass(frozen=True)
class EvalResult:
    per_user: dict[str, np.ndarray]  # metric -> [n_users] float (NaN where the user has no target)
    coverage: dict[str, float]  # "coverage@K" -> fraction of the catalog in anyone's top K
    mean_popularity: float  # mean training popularity (interaction share) of top-20 items: popularity bias
    n_users: int

    def mean(self) -> dict[str, float]:
        out = {k: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for k, v in self.per_user.items()}
        out.update(self.coverage)
        return out


@torch.no_grad()
def evaluate(
    score: ScoreFn,
    fold_in: sp.csr_matrix,
    targets: sp.csr_matrix,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 2000,
    ks_recall: tuple[int, ...] = (20, 50),
    ks_ndcg: tuple[int, ...] = (100,),
    coverage_k: int = 20,
    item_popularity: torch.Tensor | None = None,
) -> EvalResult:
    x = DeviceCSR.from_scipy(fold_in, device)
    t = DeviceCSR.from_scipy(targets, device)
    n_users, n_items = x.shape
    parts: dict[str, list[torch.Tensor]] = {}
    tops: list[torch.Tensor] = []
    for start in range(0, n_users, batch_size):
        rows = torch.arange(start, min(n_users, start + batch_size), device=x.device)
        hist = x.batch(rows)
        scores = score(hist).float()
        scores[hist.rows, hist.cols] = -torch.inf  # never rank the fold-in items
        for name, values in ranking_metrics(scores, t.dense_rows(rows) > 0, ks_recall, ks_ndcg).items():
            parts.setdefault(name, []).append(values.cpu())
        tops.append(topk_items(scores, coverage_k).cpu())
    per_user = {k: torch.cat(v).numpy() for k, v in parts.items()}
    top = torch.cat(tops) if tops else torch.zeros(0, coverage_k, dtype=torch.int64)
    coverage = {f"coverage@{coverage_k}": coverage_at_k(top, n_items, coverage_k)}
    mean_pop = float("nan")
    if item_popularity is not None and top.numel():
        share = item_popularity.float() / item_popularity.float().sum().clamp_min(1.0)
        mean_pop = float(share[top].mean())
    return EvalResult(per_user, coverage, mean_pop, n_users)
