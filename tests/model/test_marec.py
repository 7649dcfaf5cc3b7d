"""MARec-EASE's closed form against a direct solve, and its structure when p = 1 (MAREC.md §2)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from model.ease import EASEConfig, ease_weights
from model.marec import (
    MARec,
    MARecConfig,
    closed_form_weights,
    dr_diagonal,
    fit_mu,
    item_counts,
    regressors,
    structured_weights,
)
from model.metadata import smoothed_cosine
from model.sparse import DeviceCSR


def _toy(n_users: int = 40, n_items: int = 12, cold: tuple[int, ...] = (3, 7, 10), seed: int = 0):
    rng = np.random.default_rng(seed)
    x = (rng.random((n_users, n_items)) < 0.3).astype(np.float32)
    x[:, list(cold)] = 0
    feats = (rng.random((n_items, 5)) < 0.5).astype(np.float32)
    s = smoothed_cosine(feats, delta=1.0).astype(np.float64)
    return sp.csr_matrix(x), s


def test_closed_form_solves_the_regularised_objective_directly() -> None:
    """Θ minimises ‖X − XΘ‖² + λ‖Θ‖² + α tr-term with diag Θ = 0: check against the KKT system per column."""
    x, s = _toy()
    d, _ = dr_diagonal(item_counts(x).astype(float), beta=3.0)
    alpha, l2 = 0.5, 2.0
    theta = closed_form_weights(x, s, d, alpha, l2)
    xd = x.toarray().astype(np.float64)
    g = xd.T @ xd
    m = g + alpha * (g @ s) * d[None, :]
    n = m.shape[0]
    # direct: for each column j, solve (M + λI) θ = M e_j − γ e_j with θ_j = 0 (the Lagrangian of diag = 0)
    for j in range(n):
        a = np.zeros((n + 1, n + 1))
        a[:n, :n] = m + l2 * np.eye(n)
        a[:n, n] = np.eye(n)[j]
        a[n, j] = 1.0
        rhs = np.concatenate([m[:, j], [0.0]])
        sol = np.linalg.solve(a, rhs)
        np.testing.assert_allclose(theta[:, j], sol[:n], rtol=1e-8, atol=1e-10)
    assert np.allclose(np.diag(theta), 0)


def test_p_equal_one_structure_warm_block_is_ease_cold_rows_zero_cold_order_independent_of_alpha_beta() -> None:
    x, s = _toy()
    counts = item_counts(x)
    d, p = dr_diagonal(counts.astype(float), beta=5.0)
    assert p == 1.0 and set(np.flatnonzero(d)) == {3, 7, 10}
    theta = closed_form_weights(x, s, d, alpha=2.0, l2=3.0)
    warm = counts > 0
    ease = ease_weights(sp.csr_matrix(x[:, np.flatnonzero(warm)]), EASEConfig(l2=3.0, dtype="float64")).numpy()
    np.testing.assert_allclose(theta[np.ix_(warm, warm)], ease, rtol=1e-8, atol=1e-10)
    assert np.allclose(theta[~warm], 0)  # cold rows
    # the structured assembly equals the general form
    np.testing.assert_allclose(structured_weights(x, s, 2.0, 5.0, 3.0, np.dtype(np.float64)), theta, rtol=1e-7, atol=1e-9)
    # cold columns scale with αβ only: their order for any user is the same for other α, β
    d2, _ = dr_diagonal(counts.astype(float), beta=50.0)
    theta2 = closed_form_weights(x, s, d2, alpha=0.3, l2=3.0)
    np.testing.assert_allclose(theta2[:, ~warm] * (2.0 * 5.0) / (0.3 * 50.0), theta[:, ~warm], rtol=1e-7, atol=1e-10)


def test_fit_mu_is_nonnegative_and_prefers_the_informative_block() -> None:
    rng = np.random.default_rng(1)
    n_items = 30
    groups = rng.integers(0, 3, n_items)
    informative = (groups[:, None] == groups[None, :]).astype(np.float64)
    np.fill_diagonal(informative, 0)
    noise = rng.random((n_items, n_items))
    noise = (noise + noise.T) / 2
    np.fill_diagonal(noise, 0)
    # users click within one group
    x = np.zeros((200, n_items), dtype=np.float32)
    for u in range(200):
        members = np.flatnonzero(groups == u % 3)
        x[u, rng.choice(members, size=4, replace=False)] = 1
    mu = fit_mu(sp.csr_matrix(x), regressors([informative, noise], second_order=False), MARecConfig(mu_zeros=5000))
    assert (mu >= 0).all() and mu[0] > 0 and mu[0] > 5 * mu[1]


def test_recommender_scores_cold_items_from_metadata() -> None:
    x, s = _toy()
    rec = MARec(MARecConfig(l2=3.0, second_order=False)).fit(x, similarities=[s.astype(np.float32)])
    assert rec.weights.shape == (12, 12) and rec.mu.shape == (1,)
    hist = DeviceCSR.from_scipy(x[:5], "cpu").batch(torch.arange(5))
    scores = rec.score(hist)
    assert scores.shape == (5, 12) and scores[:, [3, 7, 10]].abs().sum() > 0
    items, _ = rec.recommend(x[:5], k=3)  # the shared Recommender path: seen items filtered
    seen = x[:5].toarray() > 0
    assert items.shape == (5, 3) and not any(seen[u, items[u]].any() for u in range(5))
    with pytest.raises(ValueError, match="needs similarities"):
        MARec().fit(x)
