"""The Recommender contract, for every registered model: fit, recommend, filtering, cold users, batching,
clipping, pickling, input validation."""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from model.base import Recommender
from model.ease import EASEConfig
from model.pia import PIAConfig
from model.recommenders import MODEL_NAMES, Autoencoder, make_recommender
from model.recvae import RecVAEConfig
from model.sparse import DeviceCSR
from model.split import Split
from model.train import TrainConfig
from model.vae import VAEConfig, dae_config

K = 5


def tiny_recommender(name: str) -> Recommender:
    train = TrainConfig(epochs=2, batch_size=40, device="cpu", progress=False, seed=0)
    model_config: Any = None
    if name.startswith("multivae"):
        model_config = VAEConfig(hidden_dims=(32,), latent_dim=8)
    elif name == "multidae":
        model_config = dae_config(latent_dim=8)
    elif name.startswith("recvae"):
        model_config = RecVAEConfig(hidden_dim=32, latent_dim=8)
    pia = PIAConfig(weight=0.5) if name.endswith("-pia") else None
    return make_recommender(name, train=train, pia=pia, ease=EASEConfig(l2=10.0), model_config=model_config)


@pytest.fixture(scope="module", params=MODEL_NAMES)
def fitted(request: pytest.FixtureRequest, split: Split) -> Recommender:
    rec = tiny_recommender(request.param)
    assert rec.name == request.param
    out = rec.fit(split.train, split.valid)
    assert out is rec and rec.n_items == split.train.shape[1] and rec.fit_seconds > 0
    return rec


@pytest.fixture(scope="module")
def history(split: Split) -> sp.csr_matrix:
    """Held-out users' fold-in rows plus one cold user (empty row) in the middle."""
    fold_in = split.valid.fold_in
    empty = sp.csr_matrix((1, fold_in.shape[1]), dtype=np.float32)
    return sp.vstack([fold_in[:10], empty, fold_in[10:]], format="csr")


COLD = 10


def with_duplicates(m: sp.csr_matrix) -> sp.csr_matrix:
    """`m` with each non-empty row's first entry stored twice (a non-canonical CSR, as outside callers may pass)."""
    rows = [(m.indices[m.indptr[r]:m.indptr[r + 1]], m.data[m.indptr[r]:m.indptr[r + 1]]) for r in range(m.shape[0])]
    indices = np.concatenate([np.r_[i[:1], i] for i, _ in rows]).astype(np.int32)
    data = np.concatenate([np.r_[d[:1], d] for _, d in rows]).astype(np.float32)
    indptr = np.r_[0, np.cumsum([len(i) + (len(i) > 0) for i, _ in rows])]
    return sp.csr_matrix((data, indices, indptr), shape=m.shape)


def seen_sets(history: sp.csr_matrix) -> list[set[int]]:
    return [set(history.indices[history.indptr[r] : history.indptr[r + 1]].tolist()) for r in range(history.shape[0])]


class TestRecommenderContract:
    def test_shapes_dtypes_and_order(self, fitted: Recommender, history: sp.csr_matrix) -> None:
        items, scores = fitted.recommend(history, K)
        assert items.shape == scores.shape == (history.shape[0], K)
        assert items.dtype == np.int64 and scores.dtype == np.float32
        assert items.min() >= 0 and items.max() < fitted.n_items
        assert np.all(np.diff(scores, axis=1) <= 0)  # best first
        for row in items:
            assert len(set(row.tolist())) == K  # distinct
        assert np.isfinite(scores).all()  # every held-out user has more than K unseen items

    def test_seen_items_are_filtered(self, fitted: Recommender, history: sp.csr_matrix) -> None:
        n = fitted.n_items
        items, scores = fitted.recommend(history, K)
        for r, seen in enumerate(seen_sets(history)):
            assert not seen & set(items[r].tolist()), r
        # filter_seen=True is exactly the unfiltered ranking with the seen items removed
        all_items, all_scores = fitted.recommend(history, n, filter_seen=False)
        full = np.empty((history.shape[0], n), np.float32)
        np.put_along_axis(full, all_items, all_scores, axis=1)
        full[history.nonzero()] = -np.inf
        np.testing.assert_array_equal(np.take_along_axis(full, items, 1), scores)
        assert np.all(np.sort(full, axis=1)[:, ::-1][:, :K] == scores)

    def test_seen_items_never_get_a_finite_score(self, fitted: Recommender, history: sp.csr_matrix) -> None:
        # k = the whole catalog: the unseen items come first with finite scores, the seen ones (if
        # returned at all to fill k) are marked -inf
        items, scores = fitted.recommend(history, fitted.n_items)
        for r, seen in enumerate(seen_sets(history)):
            finite = np.isfinite(scores[r])
            assert set(items[r][finite].tolist()) == set(range(fitted.n_items)) - seen, r
            assert np.all(scores[r][~finite] == -np.inf)

    def test_seen_items_can_appear_unfiltered(self, fitted: Recommender, history: sp.csr_matrix) -> None:
        items, scores = fitted.recommend(history, K, filter_seen=False)
        assert np.isfinite(scores).all()
        hits = sum(len(seen & set(items[r].tolist())) for r, seen in enumerate(seen_sets(history)))
        assert hits > 0

    def test_cold_user_gets_valid_items(self, fitted: Recommender, history: sp.csr_matrix) -> None:
        assert history[COLD].nnz == 0
        items, scores = fitted.recommend(history[COLD : COLD + 1], K)
        assert items.shape == (1, K) and len(set(items[0].tolist())) == K
        assert items.min() >= 0 and items.max() < fitted.n_items
        assert np.isfinite(scores).all()
        only_empty = sp.csr_matrix((3, fitted.n_items), dtype=np.float32)
        items3, scores3 = fitted.recommend(only_empty, K)
        assert (items3 == items3[0]).all() and np.isfinite(scores3).all()  # all cold users alike

    def test_batching_does_not_change_results(self, fitted: Recommender, history: sp.csr_matrix) -> None:
        items1, scores1 = fitted.recommend(history, K, batch_size=1)
        seen: list[int] = []
        items7, scores7 = fitted.recommend(history, K, batch_size=7, on_batch=seen.append)
        assert sum(seen) == history.shape[0] and max(seen) == 7  # progress: every row once, per batch
        items_all, scores_all = fitted.recommend(history, K, batch_size=1000)
        np.testing.assert_array_equal(items1, items_all)
        np.testing.assert_array_equal(items7, items_all)
        np.testing.assert_allclose(scores1, scores_all, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(scores7, scores_all, rtol=1e-5, atol=1e-6)

    def test_score_into_a_buffer_equals_a_fresh_score(self, fitted: Recommender, history: sp.csr_matrix) -> None:
        batch = DeviceCSR.from_scipy(history[:9], fitted.device).batch(torch.arange(9))
        with torch.no_grad():
            fresh = fitted.score(batch).float().clone()
            buf = torch.full((9, fitted.n_items), float("nan"), device=fitted.device)
            into = fitted.score(batch, out=buf)
            torch.testing.assert_close(into.float(), fresh)
            assert (into.data_ptr() == buf.data_ptr()) == fitted.scores_into_buffer
            wrong = torch.zeros(3, fitted.n_items, device=fitted.device)  # mismatched: ignored, not written
            torch.testing.assert_close(fitted.score(batch, out=wrong).float(), fresh)
            assert not wrong.any()

    def test_k_is_clipped_to_the_catalog(self, fitted: Recommender, history: sp.csr_matrix) -> None:
        items, scores = fitted.recommend(history, 10_000, filter_seen=False)
        assert items.shape == scores.shape == (history.shape[0], fitted.n_items)
        np.testing.assert_array_equal(np.sort(items, axis=1), np.tile(np.arange(fitted.n_items), (history.shape[0], 1)))
        assert fitted.recommend(history, 0)[0].shape == (history.shape[0], 0)

    def test_no_users(self, fitted: Recommender) -> None:
        items, scores = fitted.recommend(sp.csr_matrix((0, fitted.n_items), dtype=np.float32), K)
        assert items.shape == scores.shape == (0, K)
        assert items.dtype == np.int64 and scores.dtype == np.float32
        no_users = sp.csr_matrix((0, fitted.n_items), dtype=np.float32)
        assert fitted.recommend(no_users, 10_000)[0].shape == (0, fitted.n_items)

    def test_pickle_round_trip(self, fitted: Recommender, history: sp.csr_matrix) -> None:
        before = fitted.recommend(history, K)
        clone = pickle.loads(pickle.dumps(fitted))
        after = clone.recommend(history, K)
        np.testing.assert_array_equal(before[0], after[0])
        np.testing.assert_array_equal(before[1], after[1])
        np.testing.assert_array_equal(fitted.recommend(history, K)[0], before[0])  # the original still works

    def test_wrong_item_columns_raise(self, fitted: Recommender, history: sp.csr_matrix) -> None:
        for cols in (fitted.n_items - 1, fitted.n_items + 3):
            with pytest.raises(ValueError, match="item columns"):
                fitted.recommend(sp.csr_matrix((2, cols), dtype=np.float32), K)

    def test_duplicate_entries_are_summed_not_a_crash(self, fitted: Recommender, history: sp.csr_matrix) -> None:
        # a (user, item) pair stored twice: the device copy merges it, so the host's row lengths must agree
        doubled = with_duplicates(history)
        assert doubled.nnz > history.nnz and not doubled.has_canonical_format
        items, _ = fitted.recommend(doubled, K)
        seen = seen_sets(history)
        assert all(not (set(row.tolist()) & seen[u]) for u, row in enumerate(items))
        fresh = tiny_recommender(fitted.name)
        assert fresh.fit(with_duplicates(history)) is fresh
        assert fresh.recommend(history, K)[0].shape == (history.shape[0], K)

    def test_fit_on_empty_matrix_raises(self, fitted: Recommender) -> None:
        fresh = tiny_recommender(fitted.name)
        with pytest.raises(ValueError, match="empty"):
            fresh.fit(sp.csr_matrix((20, 30), dtype=np.float32))
        with pytest.raises(ValueError, match="empty"):
            fresh.fit(sp.csr_matrix((0, 30), dtype=np.float32))


def test_registry() -> None:
    assert set(MODEL_NAMES) == {
        "popularity",
        "ease",
        "edlae",
        "multidae",
        "multivae",
        "multivae-pia",
        "recvae",
        "recvae-pia",
    }
    with pytest.raises(ValueError, match="unknown model"):
        make_recommender("svd")
    pia = make_recommender("multivae-pia")
    assert isinstance(pia, Autoencoder) and pia.pia.enabled
    assert isinstance(make_recommender("multivae", pia=PIAConfig(weight=1.0)), Autoencoder)
    assert not make_recommender("multivae", pia=PIAConfig(weight=1.0)).pia.enabled  # type: ignore[attr-defined]
    recvae = make_recommender("recvae")
    assert isinstance(recvae, Autoencoder) and recvae.train_config.lr == 5e-4  # RecVAE reference lr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pickling_leaves_a_gpu_model_on_the_gpu(split: Split) -> None:
    train = TrainConfig(epochs=1, batch_size=40, device="cuda", progress=False)
    rec = make_recommender("multivae", train=train, model_config=VAEConfig(hidden_dims=(32,), latent_dim=8))
    rec.fit(split.train)
    pickle.dumps(rec)
    assert rec.device.type == "cuda"
