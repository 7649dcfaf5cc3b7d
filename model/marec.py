"""MARec with the EASE backbone (Monteil et al., RecSys 2024; ../shared/reference/MAREC.md §2), closed form.

Inputs: X [U, I] binarised training clicks (a cold item keeps its all-zero column) and metadata similarity blocks
G^(k) [I, I] (model.metadata.smoothed_cosine).

1. S = Σ_k μ_k G^(k) + Σ_{k<l} μ_kl (G^(k) ∘ G^(l))          (pairs only with `second_order`)
   μ ≥ 0 by weighted least squares (NNLS, no intercept) of vec(X) on vec(X G): weight 1 on clicks, w0 on zeros
   (zeros subsampled, their weight scaled up by the sampling rate so the fit stays unbiased).
2. D_R = diag(d), d_j = (β/p)·max(p − n_j, 0), n_j training clicks of item j, p = max(10th percentile of n, 1).
3. M = XᵀX + α (XᵀX) S D_R,  P = (M + λ1 I)⁻¹,  Θ = I − P diag(1/diag P)   (diag Θ = 0), score = x_u Θ.

Structure when p = 1 (the usual cold-start case: ≥ 10% of items without clicks): d = β on cold items, 0 on warm;
the warm–warm block of Θ is plain EASE on the warm items, cold rows are 0, and the cold columns are
Θ_wc = αβ (X_wᵀX_w + λ1 I)⁻¹ X_wᵀX_w S_wc = αβ (S_wc − λ1 K S_wc), K = (X_wᵀX_w + λ1 I)⁻¹. So among cold items
alone the ranking does not depend on α or β; against warm items αβ sets the trade-off. `structured_weights` uses
this (one symmetric I_w × I_w inverse instead of a general I × I one); `closed_form_weights` is the general form.
`metadata_scores` = X S is the metadata-only model (the paper's "Eq 5" ablation).

Autoencoder backbone (MAREC.md §2, the paper's Eq 7): the alignment is an extra target on the output
distribution, loss_u = −Σ_j log softmax(logits_u)_j (x_uj + b_uj), b_u = α (x_u S) D_R. `AlignmentTarget` holds
the columns where D_R > 0 (the items with fewer than p clicks: the cold ones when p = 1) and S D_R on them, and
adds the b_u term to a model's loss (model.vae.MultiVAE.alignment); it is training-only, like PIA's anchors.
Pure numpy/scipy/torch: no pipeline imports.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from pydantic import BaseModel, ConfigDict, Field
from scipy.optimize import nnls
from torch import nn

from model.base import Recommender
from model.ease import _spd_inverse_inplace, gram_dense
from model.sparse import SparseBatch, sparse_matmul
from model.split import HeldOut

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)


class MARecConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    l2: float = Field(500.0, gt=0.0, description="λ1, EASE's ridge")
    alpha: float = Field(1.0, ge=0.0)
    beta: float = Field(100.0, ge=0.0, description="D_R's height on cold items")
    w0: float = Field(0.1, gt=0.0, description="weight of zero cells in the μ fit")
    second_order: bool = True
    max_pairs_blocks: int = Field(6, ge=1, description="no pair terms above this many blocks")
    mu_users: int = Field(2000, ge=1, description="users sampled for the μ fit")
    mu_zeros: int = Field(200_000, ge=1, description="zero cells sampled for the μ fit")
    seed: int = 0


def item_counts(x: sp.csr_matrix) -> np.ndarray:
    return np.asarray((sp.csr_matrix(x) > 0).sum(axis=0)).ravel().astype(np.int64)


def dr_diagonal(counts: np.ndarray, beta: float, quantile: float = 0.1) -> tuple[np.ndarray, float]:
    """(d, p): d_j = (β/p)·max(p − n_j, 0), p = max(q-quantile of n, 1)."""
    p = max(float(np.quantile(counts, quantile)), 1.0)
    return (beta / p) * np.maximum(p - counts, 0.0), p


def regressors(blocks: list[np.ndarray], second_order: bool, max_pairs_blocks: int = 6) -> list[np.ndarray]:
    """The first-order blocks, then their pairwise Hadamard products (when asked and ≤ max_pairs_blocks blocks)."""
    out = list(blocks)
    if second_order and 1 < len(blocks) <= max_pairs_blocks:
        out += [a * b for a, b in itertools.combinations(blocks, 2)]
    return out


def fit_mu(x: sp.csr_matrix, regs: list[np.ndarray], config: MARecConfig) -> np.ndarray:
    """μ ≥ 0 [len(regs)] by NNLS on sampled cells of X (all clicks of the sampled users, sampled zeros)."""
    rng = np.random.default_rng(config.seed)
    x = sp.csr_matrix(x)
    n_users, n_items = x.shape
    users = np.sort(rng.choice(n_users, size=min(n_users, config.mu_users), replace=False))
    xs = sp.csr_matrix(x[users] > 0, dtype=np.float32)
    pos = xs.nonzero()
    n_zero_total = xs.shape[0] * n_items - xs.nnz
    n_zero = min(config.mu_zeros, n_zero_total)
    # draw zero cells: oversample flat indices, drop clicks, keep the first n_zero distinct ones
    flat_pos = set((pos[0].astype(np.int64) * n_items + pos[1]).tolist())
    cand = rng.choice(xs.shape[0] * n_items, size=min(xs.shape[0] * n_items, 2 * n_zero + xs.nnz), replace=False)
    zeros = np.array([c for c in cand.tolist() if c not in flat_pos][:n_zero], dtype=np.int64)
    rows = np.concatenate([pos[0], zeros // n_items])
    cols = np.concatenate([pos[1], zeros % n_items])
    y = np.concatenate([np.ones(len(pos[0])), np.zeros(len(zeros))])
    w0 = config.w0 * (n_zero_total / max(len(zeros), 1))  # each sampled zero stands for this many
    w = np.sqrt(np.concatenate([np.ones(len(pos[0])), np.full(len(zeros), w0)]))
    a = np.zeros((len(y), len(regs)), dtype=np.float64)
    # (X R)_uj = Σ_{i ∈ X_u} R_ij, gathered only for the sampled cells (a dense X R per regressor costs |X| · I)
    order = np.argsort(rows, kind="stable")
    bounds = np.searchsorted(rows[order], np.arange(xs.shape[0] + 1))
    for u in range(xs.shape[0]):
        cells = order[bounds[u] : bounds[u + 1]]
        hist = xs.indices[xs.indptr[u] : xs.indptr[u + 1]]
        if len(cells) == 0 or len(hist) == 0:
            continue
        for k, g in enumerate(regs):
            a[cells, k] = g[np.ix_(hist, cols[cells])].sum(axis=0)
    mu, _ = nnls(a * w[:, None], y * w)
    return mu


def combine(regs: list[np.ndarray], mu: np.ndarray) -> np.ndarray:
    """S = Σ μ_r R_r [I, I] float32."""
    s = np.zeros_like(regs[0], dtype=np.float32)
    for m, r in zip(mu, regs, strict=True):
        if m:
            s += np.float32(m) * r
    return s


def top_k_columns(m: np.ndarray, k: int) -> np.ndarray:
    """m with each column kept on its k largest entries (ties at the cut kept), the rest 0; k <= 0: m itself.

    Not in the paper: S restricted to each cold item's k nearest items, which is what helps on coarse metadata
    (docs/results.md, cold start: "marec-topk")."""
    if k <= 0 or k >= m.shape[0]:
        return m
    cut = -np.partition(-m, k - 1, axis=0)[k - 1]  # k-th largest per column
    return np.where(m >= cut[None, :], m, np.float32(0.0)).astype(m.dtype, copy=False)


def closed_form_weights(x: sp.csr_matrix, s: np.ndarray, d: np.ndarray, alpha: float, l2: float,
                        dtype: np.dtype = F64) -> np.ndarray:
    """Θ [I, I] from MAREC.md §2's closed form (general: any D_R; one non-symmetric I × I inverse)."""
    g = gram_dense(sp.csr_matrix(x, dtype=np.float32), np.dtype(dtype))
    m = g + alpha * (g @ s.astype(dtype)) * d.astype(dtype)[None, :]
    m[np.diag_indices_from(m)] += l2
    p = np.linalg.inv(m)
    theta = -p / np.diag(p)[None, :]
    np.fill_diagonal(theta, 0.0)
    return theta


def structured_parts(x: sp.csr_matrix, s: np.ndarray, l2: float, warm: np.ndarray,
                     dtype: np.dtype = F32) -> tuple[np.ndarray, np.ndarray]:
    """(B_ww, C_wc): EASE on the warm items [Iw, Iw] and the cold columns per unit αβ [Iw, Ic] (valid when p = 1)."""
    warm = np.asarray(warm, dtype=bool)
    xw = sp.csr_matrix(x)[:, np.flatnonzero(warm)]
    k = gram_dense(sp.csr_matrix(xw, dtype=np.float32), np.dtype(dtype))
    k[np.diag_indices_from(k)] += l2
    k = _spd_inverse_inplace(k)  # K = (X_wᵀX_w + λ1 I)⁻¹, in place
    s_wc = np.ascontiguousarray(s[np.ix_(warm, ~warm)], dtype=dtype)
    c = s_wc - dtype.type(l2) * (k @ s_wc)  # K X_wᵀX_w S_wc = (I − λ1 K) S_wc
    dk = np.diag(k).copy()
    k /= -dk[None, :]  # B = −K diag(1/diag K), diag 0: EASE
    np.fill_diagonal(k, 0.0)
    return k, c


def structured_weights(x: sp.csr_matrix, s: np.ndarray, alpha: float, beta: float, l2: float,
                       dtype: np.dtype = F32) -> np.ndarray:
    """Θ [I, I] assembled from structured_parts (requires p = 1, i.e. d = β on cold items and 0 elsewhere)."""
    warm = item_counts(x) > 0
    b, c = structured_parts(x, s, l2, warm, dtype)
    theta = np.zeros((x.shape[1], x.shape[1]), dtype=dtype)
    wi, ci = np.flatnonzero(warm), np.flatnonzero(~warm)
    theta[np.ix_(wi, wi)] = b
    theta[np.ix_(wi, ci)] = dtype.type(alpha * beta) * c
    return theta


def metadata_scores(x: sp.csr_matrix, s: np.ndarray) -> np.ndarray:
    """X S [U, I]: the metadata-only scores (MAREC.md "Eq 5")."""
    return np.asarray(sp.csr_matrix(x, dtype=np.float32) @ s)


class AlignmentTarget:
    """MARec's b_u = α (x_u S) D_R on the columns where D_R > 0, as a loss term: −Σ_j log p_uj b_uj (MAREC.md §2).

    b_u depends only on the user's own (binary) training row, so it is computed per batch from the batch itself
    (x_u S_c, a [B, I] × [I, C] product) instead of being stored for every user."""

    def __init__(self, cols: np.ndarray, s_cols: np.ndarray, alpha: float = 1.0):
        cols = np.asarray(cols, dtype=np.int64)
        if s_cols.ndim != 2 or s_cols.shape[1] != len(cols):
            raise ValueError(f"s_cols must be [I, {len(cols)}] (one column per aligned item), got {s_cols.shape}")
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        self.cols = torch.from_numpy(cols)
        self.s_cols = torch.from_numpy(np.ascontiguousarray(s_cols, dtype=np.float32))
        self.alpha = float(alpha)

    @classmethod
    def from_similarity(cls, s: np.ndarray, counts: np.ndarray, alpha: float, beta: float) -> AlignmentTarget:
        """From S [I, I] and the items' training clicks: D_R by `dr_diagonal` (β on the cold items when p = 1)."""
        d, _ = dr_diagonal(np.asarray(counts, dtype=np.float64), beta)
        cols = np.flatnonzero(d > 0)
        return cls(cols, np.asarray(s[:, cols], dtype=np.float32) * d[cols].astype(np.float32)[None, :], alpha)

    @property
    def n_items(self) -> int:
        return int(self.s_cols.shape[0])

    def to(self, device: torch.device | str) -> AlignmentTarget:
        self.cols, self.s_cols = self.cols.to(device), self.s_cols.to(device)
        return self

    def targets(self, x: SparseBatch) -> torch.Tensor:
        """b [B, C] for the batch's users (their training rows, binarised)."""
        return self.alpha * sparse_matmul(x.binary(), self.s_cols)

    def nll(self, logits: torch.Tensor, x: SparseBatch) -> torch.Tensor:
        """−Σ_c log softmax(logits_u)_c b_uc per user [B]."""
        if logits.shape[1] != self.n_items:
            raise ValueError(f"the alignment target covers {self.n_items} items, the model scores {logits.shape[1]}")
        log_p = nn.functional.log_softmax(logits.float(), dim=-1).index_select(1, self.cols)
        return -(log_p * self.targets(x)).sum(dim=-1)


class MARec(Recommender):
    """MARec-EASE behind the Recommender interface: `fit(train, similarities=[G1, G2, ...])` (blocks over the
    same item columns as `train`); scores like EASE (x_u Θ), so it saves and serves as a dense item-item matrix."""

    name = "marec"

    def __init__(self, config: MARecConfig | None = None):
        self.config = config or MARecConfig()
        self.weights = torch.zeros(0, 0)
        self.mu = np.zeros(0)
        self.p = 1.0
        self.timings: dict[str, float] = {}

    def _fit(self, train: sp.csr_matrix, valid: HeldOut | None, **kwargs: Any) -> None:
        blocks: list[np.ndarray] = kwargs.get("similarities") or []
        if not blocks or any(b.shape != (train.shape[1], train.shape[1]) for b in blocks):
            n = train.shape[1]
            raise ValueError(f"MARec needs similarities=[G, ...], each [{n}, {n}] over the item columns")
        cfg = self.config
        t0 = time.perf_counter()
        regs = regressors(blocks, cfg.second_order, cfg.max_pairs_blocks)
        self.mu = fit_mu(train, regs, cfg)
        s = combine(regs, self.mu)
        t1 = time.perf_counter()
        d, self.p = dr_diagonal(item_counts(train).astype(np.float64), cfg.beta)
        theta = (structured_weights(train, s, cfg.alpha, cfg.beta, cfg.l2) if self.p == 1.0
                 else closed_form_weights(train, s, d, cfg.alpha, cfg.l2, np.dtype(np.float32)))
        self.weights = torch.from_numpy(np.ascontiguousarray(theta, dtype=np.float32))
        self.timings = {"mu_seconds": t1 - t0, "solve_seconds": time.perf_counter() - t1}

    def score(self, history: SparseBatch, out: torch.Tensor | None = None) -> torch.Tensor:
        w = self.weights
        return nn.functional.embedding_bag(history.cols, w, history.offsets, mode="sum",
                                           per_sample_weights=history.vals.to(w.dtype)).float()
