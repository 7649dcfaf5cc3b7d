"""Choose the cold head's δ and `neighbours` at training, on titles made cold for the occasion (issue 29).

The research protocol (pipeline.research.cold_start) picks δ and the neighbourhood size on a cold-val split; the
best values differ by catalogue (docs/results.md: the dense similarity wins with people and plots, k = 100 nearest
titles with a few coarse genres). The weekly job has no such split, so it makes one from its own training clicks:

1. hold out a random share of the clicked titles that have metadata (`ColdHeadTuning.holdout`): their clicks
   leave the matrix, as if they were new;
2. for each δ, fit the head on what is left (featurizers, μ by NNLS) and compute the held-out titles' columns:
   S (eq5, the autoencoders' head) or MARec's S − λ1 K S with K = (XᵀX + λ1 I)⁻¹ of the remaining clicks (EASE);
   for each k keep S on each held-out title's k nearest clicked titles (model.marec.top_k_columns);
3. rank the held-out titles for the users who clicked one (their other clicks as history): NDCG@k_eval among the
   held-out titles only, αβ aside (it does not change that order). The best (δ, k) wins; ties go to the earlier
   pair of the grids.

The featurizers see every title's metadata (a real new title's values may be outside their vocabulary: slightly
optimistic for all pairs alike). Pure numpy/scipy/torch: no pipeline imports.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from model.cold_head import ColdHeadConfig, ColdHeadTuning, MetadataOnly, build_cold_head, featurize
from model.ease import _spd_inverse_inplace, gram_dense
from model.marec import item_counts, top_k_columns
from model.metrics import mean_over_valid, ranking_metrics


@dataclass(frozen=True)
class TunedColdHead:
    delta: float
    neighbours: int
    ndcg: float  # the winner's NDCG@k_eval on the held-out titles
    held_out: int  # titles made cold
    users: int  # users who ranked them
    rows: list[dict[str, float]] = field(default_factory=list)  # every (delta, neighbours, ndcg) tried

    def summary(self) -> str:
        return (f"delta={self.delta:g} neighbours={self.neighbours} ndcg={self.ndcg:.4f} "
                f"({self.held_out} titles held out, {self.users} users)")


def tune_cold_head(train: sp.csr_matrix, items: Mapping[str, Sequence[Any]], config: ColdHeadConfig,
                   tuning: ColdHeadTuning, l2: float | None = None) -> TunedColdHead:
    """The best (δ, neighbours) of `tuning`'s grids for a head built with `config`'s other settings on `train`
    [U, I] (the model's training clicks) and `items` (one value per model column). `l2`: λ1 of a linear (EASE)
    model, whose head scores MARec's cold column; None: the metadata-only head. ValueError when there is too
    little to hold out (fewer than 2 clicked titles with metadata, or no user with a click on one and another)."""
    x = sp.csr_matrix(train, dtype=np.float32, copy=True)
    x.data[:] = 1.0
    n_items = x.shape[1]
    _, rows = featurize(items, config.blocks, n_items)
    has_meta = np.asarray(sum(r.getnnz(axis=1) for r in rows)) > 0
    eligible = np.flatnonzero(has_meta & (item_counts(x) > 0))
    rng = np.random.default_rng(tuning.seed)
    size = min(tuning.max_holdout, round(tuning.holdout * len(eligible)))
    if size < 2:
        raise ValueError(f"{len(eligible)} clicked titles with metadata: too few to hold out {tuning.holdout:.0%} "
                         "(at least 2) and tune the cold head; set cold_head.tune to null")
    held = np.sort(rng.choice(eligible, size=size, replace=False))
    keep = np.ones(n_items, np.float32)
    keep[held] = 0.0
    x_fit = sp.csr_matrix(x @ sp.diags(keep))
    x_fit.eliminate_zeros()
    targets_all = x[:, held]
    users = np.flatnonzero((targets_all.getnnz(axis=1) > 0) & (x_fit.getnnz(axis=1) > 0))
    if not len(users):
        raise ValueError("no user clicked a held-out title and another one: nothing to tune the cold head on; "
                         "set cold_head.tune to null")
    if len(users) > tuning.max_users:
        users = np.sort(rng.choice(users, size=tuning.max_users, replace=False))
    hist = x_fit[users]
    targets = torch.from_numpy(targets_all[users].toarray() > 0)
    unclicked = np.flatnonzero(item_counts(x_fit) == 0)  # held-out and never-clicked titles: nobody's neighbour
    hk = None
    if l2 is not None:  # x_u K over the remaining clicks: MARec's cold column is S − λ1 K S
        k = gram_dense(x_fit, np.dtype(np.float32))
        k[np.diag_indices_from(k)] += l2
        hk = np.asarray(hist @ _spd_inverse_inplace(k), dtype=np.float32)
        del k
    results: list[dict[str, float]] = []
    for delta in tuning.delta_grid:
        head = build_cold_head(MetadataOnly(), x_fit, items, config.model_copy(update={"delta": delta, "neighbours": 0,
                                                                              "tune": None}))
        s = head.similarity([r[held] for r in head.warm_rows], exclude=unclicked)  # [I, held]
        for nb in tuning.neighbours_grid:
            sk = top_k_columns(s, nb)
            scores = np.asarray(hist @ sk, dtype=np.float32)
            if hk is not None:
                scores -= np.float32(l2) * (hk @ sk)
            out = ranking_metrics(torch.from_numpy(scores), targets, ks_recall=(), ks_ndcg=(tuning.k_eval,))
            results.append({"delta": float(delta), "neighbours": int(nb),
                            "ndcg": mean_over_valid(out[f"ndcg@{tuning.k_eval}"])})
    best = results[max(range(len(results)), key=lambda i: (results[i]["ndcg"], -i))]  # ties: the earlier pair
    return TunedColdHead(best["delta"], int(best["neighbours"]), best["ndcg"], len(held), len(users), results)
