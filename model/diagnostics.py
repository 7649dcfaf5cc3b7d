"""Latent-geometry diagnostics of a trained autoencoder (the PIA paper's quantities, measured on a user sample).

Given a model with `encode(batch, dropout) -> (mu, logvar)` and the users' histories (a CSR), `diagnose` measures:

- mask drift: K masked views per user at the training dropout rate (the model's own masking, in training mode,
  with seeded draws); the RMS spread of the posterior means around their view average, relative to the median
  distance between users' clean means, and the mean Jaccard overlap of each user's k nearest latent neighbours
  (Euclidean, on the view's means) between every two views;
- local vs global collaboration: "near" pairs (each user and its most similar user by item Jaccard) and
  "far-but-related" pairs (users who share at least one item, in the lowest quartile of Jaccard among sharing
  pairs); the closed-form 2-Wasserstein distance between their diagonal Gaussian posteriors,
  W2^2 = ||mu1 - mu2||^2 + ||sigma1 - sigma2||^2, on clean inputs; and the share of far pairs within the median
  near-pair W2, clean and averaged over the masked views (the paper's masking pathway);
- KL budget and collapse: mean KL(q || N(0, I)) per user, active units (units whose posterior mean varies across
  users by more than `active_threshold`, Burda et al. 2016);
- PIA: the distance between each user's clean posterior mean and the centroid of its items' anchors.

Per activity group when the caller passes group masks (the project's groups are in pipeline.training.evaluation;
this module imports nothing of pipeline). A model without a variance head (Multi-DAE) is a point posterior: the
distances are between codes (W2 of point masses) and KL is not applicable. Deterministic for a seed; the global
torch RNG and the model's train/eval mode are left as they were.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import scipy.sparse as sp
import torch
from pydantic import BaseModel, ConfigDict, Field

from model.layers import gaussian_kl
from model.sparse import DeviceCSR, SparseBatch, canonical_csr


class Encoder(Protocol):
    def encode(self, x: SparseBatch, dropout: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]: ...


class DiagnosticsConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    users: int = Field(1000, ge=3, description="users sampled (among those with at least one item)")
    views: int = Field(8, ge=2, description="K masked views per user")
    neighbours: int = Field(10, ge=1, description="k nearest latent neighbours")
    dropout: float = Field(0.5, ge=0.0, lt=1.0, description="masking rate of the views (the training dropout, 1 - rho)")
    far_quantile: float = Field(0.25, gt=0.0, lt=1.0, description="far pairs: Jaccard below this quantile of sharing pairs")
    max_pairs: int = Field(5000, ge=1, description="far-but-related pairs kept (a seeded sample)")
    active_threshold: float = Field(0.01, ge=0.0, description="a unit is active when Var_u[mu_u] exceeds this")
    seed: int = 0
    batch_size: int = Field(1000, ge=1)


@dataclass(frozen=True)
class GroupStats:
    users: int
    drift: float  # mean relative spread of the masked views' means
    knn_jaccard: float
    kl: float | None
    active_units: int | None  # None: fewer than 2 users in the group
    anchor_distance: float | None


@dataclass(frozen=True)
class Diagnostics:
    """What `diagnose` measured. Arrays are kept for plots; `to_metrics` flattens the scalars."""

    users: int
    views: int
    neighbours: int
    dropout: float
    latent_dim: int
    posterior: str  # "gaussian" or "point" (no variance head)
    scale: float  # median distance between users' clean posterior means
    drift: float  # mean over users of (RMS spread of the K views' means) / scale
    drift_median: float
    knn_jaccard: float  # mean over users and view pairs
    near_w2: np.ndarray  # [n_near] W2 of near pairs (clean inputs)
    far_w2: np.ndarray  # [n_far] W2 of far-but-related pairs (clean inputs)
    far_within_near_median: float  # share of far pairs with W2 <= median near W2 (clean)
    far_within_near_median_masked: float  # the same on masked views, averaged over views
    kl_mean: float | None
    active_units: int
    unit_variance: np.ndarray  # [d] Var_u[mu_u] per unit
    anchor_distance: float | None  # mean ||mu_u - c_u||
    anchor_distance_rel: float | None  # the same / scale
    groups: dict[str, GroupStats] = field(default_factory=dict)
    not_applicable: tuple[str, ...] = ()

    def to_metrics(self) -> dict[str, float]:
        """Flat metric names → finite values (absent when not applicable)."""
        near = self.near_w2 if self.near_w2.size else np.array([math.nan])
        far = self.far_w2 if self.far_w2.size else np.array([math.nan])
        out: dict[str, float | None] = {
            "users": self.users, "views": self.views, "latent_dim": self.latent_dim, "scale": self.scale,
            "drift": self.drift, "drift_median": self.drift_median, "knn_jaccard": self.knn_jaccard,
            "near_w2_median": float(np.median(near)), "far_w2_median": float(np.median(far)),
            "far_near_ratio": float(np.median(far) / np.median(near)) if np.median(near) > 0 else None,
            "near_pairs": self.near_w2.size, "far_pairs": self.far_w2.size,
            "far_within_near_median": self.far_within_near_median,
            "far_within_near_median_masked": self.far_within_near_median_masked,
            "kl_mean": self.kl_mean, "active_units": self.active_units,
            "active_share": self.active_units / self.latent_dim,
            "anchor_distance": self.anchor_distance, "anchor_distance_rel": self.anchor_distance_rel,
        }
        for g, s in self.groups.items():
            key = g.replace("[", "").replace("]", "").replace("+", "plus")
            out |= {f"group.{key}.users": s.users, f"group.{key}.drift": s.drift,
                    f"group.{key}.knn_jaccard": s.knn_jaccard, f"group.{key}.kl": s.kl,
                    f"group.{key}.active_units": s.active_units, f"group.{key}.anchor_distance": s.anchor_distance}
        return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(float(v))}

    def to_summary(self) -> dict[str, Any]:
        """JSON-able: the metrics, the distributions (for plots and for comparing with a later run)."""
        return {"metrics": self.to_metrics(), "posterior": self.posterior, "dropout": self.dropout,
                "neighbours": self.neighbours, "not_applicable": list(self.not_applicable),
                "near_w2": [round(float(v), 6) for v in self.near_w2],
                "far_w2": [round(float(v), 6) for v in self.far_w2],
                "unit_variance": [round(float(v), 8) for v in self.unit_variance],
                "groups": {g: vars(s) for g, s in self.groups.items()}}


# -- encoding ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def _encode_all(model: Any, x: DeviceCSR, dropout: float, seed: int | None,
                batch_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Posterior (mu, logvar) of every row. `seed` None: clean (eval mode); else the model's own masking at
    `dropout` in training mode, drawn from `seed` (the global RNG is restored afterwards)."""
    was = model.training
    mus, lvs = [], []
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        if seed is not None:
            torch.manual_seed(seed)
        model.train(seed is not None)
        try:
            for start in range(0, x.n_rows, batch_size):
                rows = torch.arange(start, min(x.n_rows, start + batch_size), device=x.device)
                mu, logvar = model.encode(x.batch(rows), dropout if seed is not None else 0.0)
                mus.append(mu.float())
                lvs.append(None if logvar is None else logvar.float())
        finally:
            model.train(was)
    logvar = None if any(v is None for v in lvs) else torch.cat(lvs)  # type: ignore[arg-type]
    return torch.cat(mus), logvar


def _knn(points: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [n, k] of each point's k nearest other points (Euclidean; ties broken by index)."""
    d = torch.cdist(points.double(), points.double())
    d.fill_diagonal_(math.inf)
    return torch.topk(d, k, dim=1, largest=False, sorted=True).indices


def _membership(idx: torch.Tensor, n: int) -> torch.Tensor:
    m = torch.zeros(idx.shape[0], n, dtype=torch.bool, device=idx.device)
    m.scatter_(1, idx, True)
    return m


def w2(mu1: torch.Tensor, sd1: torch.Tensor | None, mu2: torch.Tensor, sd2: torch.Tensor | None) -> torch.Tensor:
    """Closed-form 2-Wasserstein distance between diagonal Gaussians (rows); sd None: point masses."""
    sq = (mu1 - mu2).pow(2).sum(-1)
    if sd1 is not None and sd2 is not None:
        sq = sq + (sd1 - sd2).pow(2).sum(-1)
    return sq.clamp_min(0).sqrt()


def _pairs(binary: sp.csr_matrix, cfg: DiagnosticsConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(near pairs [m, 2], far-but-related pairs [f, 2]) among the rows of a binary CSR (see the module doc)."""
    n = binary.shape[0]
    shared = (binary @ binary.T).toarray().astype(np.float64)  # [n, n] items in common
    sizes = np.asarray(binary.sum(axis=1)).ravel()
    union = sizes[:, None] + sizes[None, :] - shared
    jac = np.divide(shared, union, out=np.zeros_like(shared), where=union > 0)
    np.fill_diagonal(jac, -1.0)
    best = np.argmax(jac, axis=1)  # each user's most similar other user (lowest index on ties)
    ok = jac[np.arange(n), best] > 0
    near = np.unique(np.sort(np.stack([np.arange(n)[ok], best[ok]], 1), axis=1), axis=0)
    iu, ju = np.triu_indices(n, k=1)
    sharing = shared[iu, ju] > 0
    if not sharing.any():
        return near, np.zeros((0, 2), np.int64)
    js = jac[iu, ju][sharing]
    cut = np.quantile(js, cfg.far_quantile)
    far = np.stack([iu[sharing][js <= cut], ju[sharing][js <= cut]], 1)
    far = far[~np.isin(far[:, 0] * n + far[:, 1], near[:, 0] * n + near[:, 1])].astype(np.int64)
    if len(far) > cfg.max_pairs:
        far = far[np.sort(rng.choice(len(far), cfg.max_pairs, replace=False))]
    return near, far


# -- the diagnostics ---------------------------------------------------------------------------------------------


def sample_users(history: sp.csr_matrix, n: int, seed: int) -> np.ndarray:
    """`n` distinct rows with at least one item, sorted (seeded). ValueError when there are fewer."""
    eligible = np.flatnonzero(np.diff(history.indptr) > 0)
    if n > len(eligible):
        raise ValueError(f"a sample of {n} users was asked for but only {len(eligible)} users have a history")
    return np.sort(np.random.default_rng(seed).choice(eligible, n, replace=False))


def diagnose(model: Any, history: sp.spmatrix, config: DiagnosticsConfig | None = None,
             anchors: torch.Tensor | None = None, groups: dict[str, np.ndarray] | None = None) -> Diagnostics:
    """Diagnostics of `model` on a seeded sample of the rows of `history` (users × items, the model's columns).

    `anchors`: PIA item anchors [I, d] (optional). `groups`: name → boolean mask over the rows of `history` (e.g.
    activity groups). Raises ValueError for a sample larger than the users with a history, a neighbour count not
    below the sample, or a history whose columns do not match the anchors.
    """
    cfg = config or DiagnosticsConfig()
    hist = canonical_csr(history)
    if cfg.neighbours >= cfg.users:
        raise ValueError(f"{cfg.neighbours} neighbours need more than {cfg.neighbours} sampled users (got {cfg.users})")
    if anchors is not None and anchors.shape[0] != hist.shape[1]:
        raise ValueError(f"anchors cover {anchors.shape[0]} items but the histories have {hist.shape[1]} columns")
    rows = sample_users(hist, cfg.users, cfg.seed)
    sub = hist[rows]
    binary = sub.copy()
    binary.data[:] = 1.0
    device = next(iter(model.parameters())).device if hasattr(model, "parameters") else torch.device("cpu")
    x = DeviceCSR.from_scipy(sub, device)
    n = len(rows)

    mu, logvar = _encode_all(model, x, 0.0, None, cfg.batch_size)
    sd = None if logvar is None else torch.exp(0.5 * logvar)
    views = [_encode_all(model, x, cfg.dropout, cfg.seed * 7919 + 1 + v, cfg.batch_size) for v in range(cfg.views)]
    vmu = torch.stack([m for m, _ in views]).double()  # [K, n, d]

    dist = torch.cdist(mu.double(), mu.double())
    scale = float(dist[torch.triu_indices(n, n, 1, device=device).unbind()].median())
    denom = scale if scale > 0 else 1.0
    spread = (vmu - vmu.mean(0, keepdim=True)).pow(2).sum(-1).mean(0).sqrt()  # [n] RMS over views
    rel_drift = (spread / denom).cpu().numpy()

    k = cfg.neighbours
    members = [_membership(_knn(vmu[v], k), n) for v in range(cfg.views)]
    jac_sum = torch.zeros(n, dtype=torch.float64, device=device)
    n_pairs = 0
    for a in range(cfg.views):
        for b in range(a + 1, cfg.views):
            inter = (members[a] & members[b]).sum(1).double()
            jac_sum += inter / (2 * k - inter)
            n_pairs += 1
    knn_jac = (jac_sum / n_pairs).cpu().numpy()

    rng = np.random.default_rng(cfg.seed)
    near, far = _pairs(binary, cfg, rng)

    def pair_w2(p: np.ndarray, m: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
        i, j = torch.as_tensor(p[:, 0], device=device), torch.as_tensor(p[:, 1], device=device)
        return w2(m[i], None if s is None else s[i], m[j], None if s is None else s[j])

    near_w2 = pair_w2(near, mu, sd).cpu().numpy() if len(near) else np.zeros(0)
    far_w2 = pair_w2(far, mu, sd).cpu().numpy() if len(far) else np.zeros(0)
    within = float(np.mean(far_w2 <= np.median(near_w2))) if len(near) and len(far) else math.nan
    masked = []
    if len(near) and len(far):
        for vm, vlv in views:
            vsd = None if vlv is None else torch.exp(0.5 * vlv)
            nw, fw = pair_w2(near, vm, vsd).cpu().numpy(), pair_w2(far, vm, vsd).cpu().numpy()
            masked.append(float(np.mean(fw <= np.median(nw))))
    within_masked = float(np.mean(masked)) if masked else math.nan

    kl = None if logvar is None else gaussian_kl(mu.double(), logvar.double()).cpu().numpy()
    unit_var = mu.double().var(0, unbiased=False).cpu().numpy()

    anchor_d: np.ndarray | None = None
    if anchors is not None:
        table = anchors.detach().to(device=device, dtype=torch.float64)
        deg = torch.as_tensor(np.asarray(binary.sum(axis=1)).ravel(), device=device, dtype=torch.float64)
        coo = binary.tocoo()
        centroid = torch.zeros(n, table.shape[1], dtype=torch.float64, device=device).index_add_(
            0, torch.as_tensor(coo.row, device=device), table[torch.as_tensor(coo.col, device=device)]) / deg[:, None]
        anchor_d = (mu.double() - centroid).pow(2).sum(-1).sqrt().cpu().numpy()

    group_stats: dict[str, GroupStats] = {}
    for g, mask_all in (groups or {}).items():
        m = np.asarray(mask_all, dtype=bool)[rows]
        if not m.any():
            continue
        group_stats[g] = GroupStats(
            users=int(m.sum()), drift=float(rel_drift[m].mean()), knn_jaccard=float(knn_jac[m].mean()),
            kl=None if kl is None else float(kl[m].mean()),
            active_units=int((mu.double()[torch.as_tensor(m, device=device)].var(0, unbiased=False)
                              > cfg.active_threshold).sum()) if m.sum() >= 2 else None,
            anchor_distance=None if anchor_d is None else float(anchor_d[m].mean()))

    na = (("kl",) if kl is None else ()) + (("anchor_distance",) if anchor_d is None else ())
    return Diagnostics(
        users=n, views=cfg.views, neighbours=k, dropout=cfg.dropout, latent_dim=int(mu.shape[1]),
        posterior="point" if logvar is None else "gaussian", scale=scale, drift=float(rel_drift.mean()),
        drift_median=float(np.median(rel_drift)), knn_jaccard=float(knn_jac.mean()), near_w2=near_w2, far_w2=far_w2,
        far_within_near_median=within, far_within_near_median_masked=within_masked,
        kl_mean=None if kl is None else float(kl.mean()), active_units=int((unit_var > cfg.active_threshold).sum()),
        unit_variance=unit_var, anchor_distance=None if anchor_d is None else float(anchor_d.mean()),
        anchor_distance_rel=None if anchor_d is None else float(anchor_d.mean() / denom), groups=group_stats,
        not_applicable=na)
