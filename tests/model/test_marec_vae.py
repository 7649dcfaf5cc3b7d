"""MARec's alignment target on the Multi-VAE backbone (model.marec.AlignmentTarget, MAREC.md §2, Eq 7)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from model.marec import AlignmentTarget, dr_diagonal, item_counts
from model.recommenders import Autoencoder
from model.sparse import DeviceCSR
from model.train import TrainConfig


def _batch(x: sp.csr_matrix):
    return DeviceCSR.from_scipy(x).batch(torch.arange(x.shape[0]))


def test_target_is_alpha_x_s_dr_and_the_loss_is_the_weighted_nll() -> None:
    rng = np.random.default_rng(0)
    dense = (rng.random((6, 10)) < 0.4).astype(np.float32)
    dense[:, [7, 8]] = 0  # two cold items
    x = sp.csr_matrix(dense)
    s = rng.random((10, 10)).astype(np.float32)
    a = AlignmentTarget.from_similarity(s, item_counts(x), alpha=0.5, beta=3.0)
    d, _ = dr_diagonal(item_counts(x).astype(np.float64), 3.0)
    assert a.cols.tolist() == np.flatnonzero(d > 0).tolist() and {7, 8} <= set(a.cols.tolist())
    want_b = 0.5 * (x.toarray() > 0) @ (s[:, a.cols.numpy()] * d[a.cols.numpy()])
    np.testing.assert_allclose(a.targets(_batch(x)).numpy(), want_b, rtol=1e-5)
    logits = torch.from_numpy(rng.normal(size=(6, 10)).astype(np.float32))
    want = -(torch.log_softmax(logits, -1)[:, a.cols] * torch.from_numpy(want_b.astype(np.float32))).sum(-1)
    np.testing.assert_allclose(a.nll(logits, _batch(x)).numpy(), want.numpy(), rtol=1e-5)


def test_bad_targets_are_refused() -> None:
    with pytest.raises(ValueError, match=r"s_cols must be \[I, 2\]"):
        AlignmentTarget(np.array([1, 2]), np.zeros((5, 3), np.float32))
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        AlignmentTarget(np.array([1]), np.zeros((5, 1), np.float32), alpha=-1.0)
    a = AlignmentTarget(np.array([1]), np.ones((5, 1), np.float32))
    with pytest.raises(ValueError, match="covers 5 items, the model scores 6"):
        a.nll(torch.zeros(2, 6), _batch(sp.csr_matrix(np.ones((2, 6), np.float32))))


def _two_groups(seed: int = 0) -> tuple[sp.csr_matrix, np.ndarray]:
    """Users of group A click items 0-19, group B items 20-39; items 40-41 look like A, 42-43 like B (metadata),
    and have no clicks. S: 1 between items of the same group (the metadata's view), 0 otherwise."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(200):
        lo = 0 if u < 100 else 20
        rows += [(u, i) for i in rng.choice(np.arange(lo, lo + 20), size=8, replace=False)]
    r, c = zip(*rows, strict=True)
    x = sp.csr_matrix((np.ones(len(r), np.float32), (r, c)), shape=(200, 44))
    group = np.array([0] * 20 + [1] * 20 + [0, 0, 1, 1])
    s = (group[:, None] == group[None, :]).astype(np.float32)
    np.fill_diagonal(s, 0)
    return x, s


def test_aligned_multivae_ranks_cold_items_by_metadata_and_keeps_nothing_of_the_target() -> None:
    x, s = _two_groups()
    cfg = TrainConfig(epochs=25, seed=0, device="cpu", batch_size=50)
    cold = np.arange(40, 44)
    a = AlignmentTarget(cold, s[:, cold], alpha=0.05)  # D_R = 1 on the cold items
    aligned = Autoencoder("multivae", train=cfg).fit(x, alignment=a)
    plain = Autoencoder("multivae", train=cfg).fit(x)
    scores = aligned.score(_batch(x)).numpy()
    a_users, b_users = scores[:100], scores[100:]
    # A users rank A-like cold items above B-like ones, and the other way round
    assert (a_users[:, [40, 41]].min(1) > a_users[:, [42, 43]].max(1)).mean() > 0.95
    assert (b_users[:, [42, 43]].min(1) > b_users[:, [40, 41]].max(1)).mean() > 0.95
    assert "align" in aligned.history[-1] and "align" not in plain.history[-1]
    # training-only: the fitted module holds no target, saves the same weights as a plain Multi-VAE, pickles
    assert aligned.module.alignment is None
    assert aligned.inference_state().keys() == plain.inference_state().keys()
    again = pickle.loads(pickle.dumps(aligned))
    np.testing.assert_allclose(again.score(_batch(x)).numpy(), scores, rtol=1e-5)


def test_alignment_needs_a_multivae_of_the_same_catalogue() -> None:
    x, s = _two_groups()
    a = AlignmentTarget.from_similarity(s, item_counts(x), alpha=1.0, beta=1.0)
    with pytest.raises(ValueError, match="needs a Multi-VAE/DAE backbone, not recvae"):
        Autoencoder("recvae", train=TrainConfig(epochs=1, device="cpu")).fit(x, alignment=a)
    with pytest.raises(ValueError, match="covers 44 items, the training matrix has 43"):
        Autoencoder("multivae", train=TrainConfig(epochs=1, device="cpu")).fit(sp.csr_matrix(x[:, :43]), alignment=a)
    with pytest.raises(ValueError, match="not in the CUDA-graph step"):
        Autoencoder("multivae", train=TrainConfig(epochs=1, device="cpu", cuda_graph=True)).fit(x, alignment=a)
