"""The cold head's math (model.cold_head) against direct computations: the fitted featurizer reproduces
model.metadata's blocks on the fitted items, and a new item's MARec cold column equals the column model.marec's
closed form gives the same item when it is cold at training."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from model.cold_head import ColdHeadConfig, build_cold_head, fit_block
from model.ease import EASEConfig
from model.marec import combine, regressors, structured_weights
from model.metadata import minmax_columns, multi_hot, smoothed_cosine, tfidf
from model.recommenders import make_recommender

GENRES = ["drama", "comedy", "action", "horror", "sci-fi"]


def catalog(n: int, seed: int) -> tuple[list[list[str]], list[str]]:
    rng = np.random.default_rng(seed)
    tags = [sorted(set(rng.choice(GENRES, size=int(rng.integers(1, 4))).tolist())) for _ in range(n)]
    words = ["space ship crew", "love story city", "war hero battle", "ghost house night", "funny family trip"]
    text = [f"{words[int(rng.integers(5))]} {words[int(rng.integers(5))]}" for _ in range(n)]
    return tags, text


def test_featurizer_reproduces_model_metadata_blocks_on_the_fitted_items() -> None:
    tags, text = catalog(40, 0)
    tags[3] = ["unique-tag"]  # on one item only: dropped, as multi_hot drops it
    b = fit_block("tags", tags)
    np.testing.assert_allclose(b.transform(tags).toarray(), minmax_columns(multi_hot(tags)).toarray(), atol=1e-6)
    t = fit_block("description", text)
    np.testing.assert_allclose(t.transform(text).toarray(), minmax_columns(tfidf(text)).toarray(), atol=1e-5)
    # a new item: known values kept, unknown ones ignored, values clipped to the fitted range
    row = b.transform([["drama", "never-seen"]]).toarray()[0]
    assert row[b.vocab.index("drama")] == 1.0 and row.sum() == 1.0
    assert t.transform(["space space space ship"]).toarray().max() <= 1.0


@pytest.mark.parametrize("second_order", [False, True])
def test_marec_cold_column_equals_the_closed_form_column(second_order: bool) -> None:
    rng = np.random.default_rng(1)
    n_users, n_warm, l2, alpha, beta, delta = 80, 25, 5.0, 0.7, 3.0, 2.0
    tags, text = catalog(n_warm + 1, 2)
    clicks = (rng.random((n_users, n_warm + 1)) < 0.2).astype(np.float32)
    clicks[:, n_warm] = 0  # the last item has no clicks: cold at training
    x_all = sp.csr_matrix(clicks)
    xw = sp.csr_matrix(x_all[:, :n_warm])
    assert (np.asarray(xw.sum(axis=0)).ravel() > 0).all()
    rec = make_recommender("ease", ease=EASEConfig(l2=l2, dtype="float64")).fit(xw)
    mu = (0.3, 0.5, 0.2) if second_order else (0.3, 0.5)
    cfg = ColdHeadConfig(blocks=("tags", "description"), delta=delta, ab=alpha * beta, mu=mu, second_order=second_order)
    head = build_cold_head(rec, xw, {"tags": tags[:n_warm], "description": text[:n_warm]}, cfg)
    new_rows = head.encode({"tags": tags[n_warm:], "description": text[n_warm:]}, 1)
    c = head.cold_columns(new_rows, rec.weights)  # type: ignore[attr-defined]
    # direct: the same features for all items, S over all of them, MARec's closed form with the item cold
    blocks = [sp.vstack([w, n]).tocsr() for w, n in zip(head.warm_rows, new_rows, strict=True)]
    s = combine(regressors([smoothed_cosine(z, delta) for z in blocks], second_order), np.asarray(mu))
    theta = structured_weights(x_all, s, alpha, beta, l2, np.dtype(np.float64))
    assert np.abs(theta[:n_warm, n_warm]).max() > 1e-3  # a non-trivial column
    np.testing.assert_allclose(c[:, 0], theta[:n_warm, n_warm], rtol=1e-4, atol=1e-6)
    # the head's similarity is the same S block
    np.testing.assert_allclose(head.similarity(new_rows)[:, 0], s[:n_warm, n_warm], rtol=1e-5, atol=1e-7)


def test_autoencoders_get_the_metadata_only_head_and_mu_is_fitted() -> None:
    rng = np.random.default_rng(3)
    tags, _ = catalog(30, 4)
    x = sp.csr_matrix((rng.random((60, 30)) < 0.2).astype(np.float32))

    class Stub:  # any non-linear family: only its name matters to the head
        name = "multivae-pia"

    head = build_cold_head(Stub(), x, {"tags": tags}, ColdHeadConfig(delta=1.0))
    assert head.kind == "eq5" and not head.linear and head.k_diag is None
    assert len(head.mu) == 1 and head.mu[0] >= 0
    new = head.encode({"tags": [["drama"]]}, 1)
    s = head.similarity(new)
    drama = np.array(["drama" in t for t in tags])
    assert (s[drama, 0] > 0).all() and (s[~drama, 0] == 0).all()
    np.testing.assert_allclose(head.cold_columns(new), s)


def test_no_shared_metadata_is_refused() -> None:
    x = sp.csr_matrix(np.eye(3, dtype=np.float32))
    with pytest.raises(ValueError, match="shared by two items"):
        build_cold_head(make_recommender("ease"), x, {"tags": [["a"], ["b"], ["c"]]})


def test_neighbours_keep_each_new_items_k_nearest_and_give_marecs_truncated_column() -> None:
    """neighbours = k: S_wn kept on the k largest entries per new item (research's "marec-topk"), and the cold
    column is MARec's αβ (S_k − λ1 K S_k) with that truncated S."""
    rng = np.random.default_rng(5)
    n_users, n_warm, l2, ab, k = 120, 60, 5.0, 2.0, 7
    tags, text = catalog(n_warm + 3, 6)
    x = sp.csr_matrix((rng.random((n_users, n_warm)) < 0.2).astype(np.float32))
    rec = make_recommender("ease", ease=EASEConfig(l2=l2, dtype="float64")).fit(x)
    meta = {"tags": tags[:n_warm], "description": text[:n_warm]}
    base = {"blocks": ("tags", "description"), "delta": 1.0, "ab": ab, "mu": (0.4, 0.6, 0.3)}
    dense = build_cold_head(rec, x, meta, ColdHeadConfig(**base, neighbours=0))  # type: ignore[arg-type]
    near = build_cold_head(rec, x, meta, ColdHeadConfig(**base, neighbours=k))  # type: ignore[arg-type]
    new = dense.encode({"tags": tags[n_warm:], "description": text[n_warm:]}, 3)
    s, sk = dense.similarity(new), near.similarity(new)
    for j in range(3):
        kept = np.flatnonzero(sk[:, j])
        assert k <= len(kept) < n_warm  # ties at the cut are kept, never the whole column
        assert s[kept, j].min() >= np.delete(s[:, j], kept).max()  # the kept ones are the largest
        np.testing.assert_array_equal(sk[kept, j], s[kept, j])
    kk = np.linalg.inv(x.T.toarray().astype(np.float64) @ x.toarray() + l2 * np.eye(n_warm))
    expect = ab * (sk - l2 * kk @ sk)
    np.testing.assert_allclose(near.cold_columns(new, rec.weights), expect, rtol=1e-4, atol=1e-6)  # type: ignore[attr-defined]
    # k at or above the catalogue's size is the dense S; excluded rows never count as neighbours
    np.testing.assert_array_equal(
        build_cold_head(rec, x, meta, ColdHeadConfig(**base, neighbours=n_warm)).similarity(new), s)  # type: ignore[arg-type]
    top = int(np.argmax(s[:, 0]))
    assert near.similarity(new, exclude=np.array([top]))[top, 0] == 0.0


def test_a_negative_neighbour_count_is_refused() -> None:
    with pytest.raises(ValueError, match="neighbours"):
        ColdHeadConfig(neighbours=-1)
