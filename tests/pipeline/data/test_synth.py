"""pipeline.data.synth: realistic synthetic implicit data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pipeline.data.synth import synth_interactions, synth_interactions_with_clusters, synth_ml20m_like_csr

N_USERS, N_ITEMS = 3000, 1000


@pytest.fixture(scope="module")
def generated():
    return synth_interactions_with_clusters(N_USERS, N_ITEMS, seed=5, mean_items_per_user=30, n_clusters=8)


def as_matrix(df: pd.DataFrame, n_users: int, n_items: int) -> sp.csr_matrix:
    ones = np.ones(len(df), dtype=np.float32)
    coords = (df["user_id"].to_numpy(), df["item_id"].to_numpy())
    return sp.csr_matrix((ones, coords), shape=(n_users, n_items))


def top_share(df: pd.DataFrame, n_items: int, fraction: float = 0.01) -> float:
    counts = np.sort(np.bincount(df["item_id"].to_numpy(), minlength=n_items))[::-1]
    return counts[: max(1, int(fraction * n_items))].sum() / counts.sum()


def test_shapes_types_and_per_user_counts(generated):
    df, user_cluster, item_cluster = generated
    assert list(df.columns) == ["user_id", "item_id", "weight"]
    assert df.dtypes.tolist() == [np.dtype("int64"), np.dtype("int64"), np.dtype("float32")]
    assert df["user_id"].between(0, N_USERS - 1).all() and df["item_id"].between(0, N_ITEMS - 1).all()
    per_user = np.bincount(df["user_id"], minlength=N_USERS)
    assert per_user.min() >= 5 and per_user.max() <= N_ITEMS // 2
    assert 25 <= per_user.mean() <= 36  # log-normal around 30, clipped at 5
    assert np.median(per_user) < per_user.mean()  # right-skewed activity
    assert not df.duplicated(["user_id", "item_id"]).any()
    assert df["user_id"].is_monotonic_increasing
    assert (df["weight"] >= 1).all()
    assert user_cluster.shape == (N_USERS,) and item_cluster.shape == (N_ITEMS,)
    assert set(np.unique(item_cluster)) == set(range(8))


def test_popularity_is_power_law_like(generated):
    df = generated[0]
    share = top_share(df, N_ITEMS)
    assert share > 0.08  # top 1 % of items; uniform popularity would give about 0.01
    flat = synth_interactions(N_USERS, N_ITEMS, seed=5, popularity_exponent=0.0)
    assert top_share(flat, N_ITEMS) < 0.03  # and the exponent is what makes it skewed
    counts = np.bincount(df["item_id"], minlength=N_ITEMS)
    assert (counts > 0).mean() > 0.9  # a long tail, not just a head


def test_deterministic_for_a_seed():
    a = synth_interactions(500, 300, seed=11)
    b = synth_interactions(500, 300, seed=11)
    c = synth_interactions(500, 300, seed=12)
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(c)


def test_same_cluster_users_overlap_more(generated):
    df, user_cluster, _ = generated
    x = as_matrix(df, N_USERS, N_ITEMS)
    users = np.arange(600)  # enough pairs, fast
    xs = x[users]
    inter = (xs @ xs.T).toarray()
    sizes = np.asarray(xs.sum(axis=1)).ravel()
    jaccard = inter / (sizes[:, None] + sizes[None, :] - inter)
    same = user_cluster[users][:, None] == user_cluster[users][None, :]
    off_diag = ~np.eye(len(users), dtype=bool)
    within = jaccard[same & off_diag].mean()
    across = jaccard[~same].mean()
    assert within > 2.0 * across, (within, across)
    # Without the cluster mixture the difference disappears: the test can tell the two apart.
    df0, uc0, _ = synth_interactions_with_clusters(N_USERS, N_ITEMS, seed=5, n_clusters=8, cluster_share=0.0)
    x0 = as_matrix(df0, N_USERS, N_ITEMS)[users]
    inter0 = (x0 @ x0.T).toarray()
    s0 = np.asarray(x0.sum(axis=1)).ravel()
    j0 = inter0 / (s0[:, None] + s0[None, :] - inter0)
    same0 = uc0[users][:, None] == uc0[users][None, :]
    assert j0[same0 & off_diag].mean() < 1.3 * j0[~same0].mean()


def test_small_and_degenerate_sizes():
    df = synth_interactions(40, 10, seed=0, n_clusters=10)  # one item per cluster, users need 5 of 10
    assert (np.bincount(df["user_id"], minlength=40) == 5).all()
    assert not df.duplicated(["user_id", "item_id"]).any()
    with pytest.raises(ValueError):
        synth_interactions(10, 9, seed=0)
    with pytest.raises(ValueError):
        synth_interactions(10, 100, seed=0, n_clusters=0)


def test_ml20m_like_csr_small():
    m = synth_ml20m_like_csr(n_users=4000, n_items=2000, mean_items=74, seed=3)
    assert m.shape == (4000, 2000) and m.format == "csr" and m.dtype == np.float32
    m.check_format(full_check=True)
    assert m.has_sorted_indices
    assert set(np.unique(m.data).tolist()) == {1.0}
    per_row = np.diff(m.indptr)
    assert per_row.min() >= 5 and per_row.max() <= 1000
    assert 65 <= per_row.mean() <= 85
    coo = m.tocoo()
    keys = coo.row.astype(np.int64) * m.shape[1] + coo.col
    assert len(np.unique(keys)) == m.nnz  # no duplicate (row, column)
    counts = np.sort(np.bincount(m.indices, minlength=2000))[::-1]
    assert counts[:20].sum() / m.nnz > 0.05  # popularity skew
    again = synth_ml20m_like_csr(n_users=4000, n_items=2000, mean_items=74, seed=3)
    assert (again != m).nnz == 0


def test_a_collaborative_model_beats_popularity(generated):
    """EASE (closed form) on a strong-generalization split must clearly beat the popularity ranking."""
    from model.split import strong_generalization_split

    df = generated[0]
    split = strong_generalization_split(as_matrix(df, N_USERS, N_ITEMS), seed=0)
    gram = (split.train.T @ split.train).toarray().astype(np.float64)
    p = np.linalg.inv(gram + 50.0 * np.eye(gram.shape[0]))
    b = -p / np.diag(p)
    np.fill_diagonal(b, 0.0)
    held = split.valid
    seen = held.fold_in.toarray() > 0
    targets = held.targets.toarray() > 0

    def recall_at_20(scores: np.ndarray) -> float:
        scores = np.where(seen, -np.inf, scores)
        top = np.argsort(-scores, axis=1, kind="stable")[:, :20]
        hits = np.take_along_axis(targets, top, axis=1).sum(axis=1)
        n = targets.sum(axis=1)
        return float((hits[n > 0] / np.minimum(20, n[n > 0])).mean())

    popularity = np.asarray(split.train.sum(axis=0), dtype=np.float64).ravel()
    pop_recall = recall_at_20(np.broadcast_to(popularity, seen.shape))
    ease_recall = recall_at_20(held.fold_in @ b)
    assert ease_recall > 1.3 * pop_recall, (ease_recall, pop_recall)
