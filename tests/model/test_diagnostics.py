"""model.diagnostics on synthetic cases whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from pydantic import ValidationError
from torch import nn

from model.diagnostics import DiagnosticsConfig, diagnose, w2
from model.sparse import SparseBatch
from model.vae import MultiVAE, VAEConfig, dae_config


def histories(n_users: int = 120, n_items: int = 40, seed: int = 1) -> sp.csr_matrix:
    x = sp.random(n_users, n_items, density=0.2, random_state=seed, format="csr", dtype=np.float32)
    x.data[:] = 1.0
    x = x.tolil()
    for u in range(n_users):  # every user has a history
        x[u, u % n_items] = 1.0
    return x.tocsr()


class Constant(nn.Module):
    """Every user gets the same posterior: a collapsed model."""

    def __init__(self, d: int = 4):
        super().__init__()
        self.mu = nn.Parameter(torch.arange(d, dtype=torch.float32))

    def encode(self, x: SparseBatch, dropout: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        mu = self.mu.expand(x.n_rows, -1)
        return mu, torch.zeros_like(mu)


class AnchorMean(nn.Module):
    """mu = the mean of the item table's rows over the user's items: exactly the PIA anchor centroid."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table.clone())

    def encode(self, x: SparseBatch, dropout: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        mu = nn.functional.embedding_bag(x.cols, self.table, x.offsets, mode="mean")
        return mu, torch.zeros_like(mu)


CFG = DiagnosticsConfig(users=60, views=3, neighbours=5, seed=0)


def tiny_vae(**kw: object) -> MultiVAE:
    torch.manual_seed(0)
    return MultiVAE(40, VAEConfig(hidden_dims=(16,), latent_dim=6, **kw))  # type: ignore[arg-type]


def test_w2_closed_form() -> None:
    mu1, sd1 = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    mu2, sd2 = torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 3.0]])
    assert w2(mu1, sd1, mu2, sd2).item() == pytest.approx(math.sqrt(25 + 4))
    assert w2(mu1, sd1, mu1, sd1).item() == 0.0  # identical posteriors
    assert w2(mu1, None, mu2, None).item() == pytest.approx(5.0)  # point masses: the distance of the means


def test_collapsed_model_has_no_active_units_and_zero_distances() -> None:
    r = diagnose(Constant(), histories(), CFG)
    assert r.active_units == 0
    assert r.to_metrics()["active_share"] == 0.0
    assert r.near_w2.size > 0 and np.all(r.near_w2 == 0) and np.all(r.far_w2 == 0)  # identical posteriors → W2 0
    assert r.scale == 0.0 and r.drift == 0.0
    assert r.kl_mean == pytest.approx(0.5 * sum(i * i for i in range(4)))  # KL of N(mu, I) against N(0, I)


def test_no_masking_means_no_drift_and_stable_neighbours() -> None:
    r = diagnose(tiny_vae(), histories(), CFG.model_copy(update={"dropout": 0.0}))
    assert r.drift == pytest.approx(0.0, abs=1e-12) and r.drift_median == pytest.approx(0.0, abs=1e-12)
    assert r.knn_jaccard == pytest.approx(1.0)  # identical views → identical neighbourhoods
    assert r.far_within_near_median_masked == pytest.approx(r.far_within_near_median)


def test_masking_moves_posteriors_and_neighbourhoods() -> None:
    r = diagnose(tiny_vae(), histories(), CFG.model_copy(update={"dropout": 0.5}))
    assert r.drift > 0.0
    assert 0.0 <= r.knn_jaccard < 1.0
    assert r.active_units == 6 and r.posterior == "gaussian" and r.kl_mean is not None and r.kl_mean > 0


def test_deterministic_for_a_seed_and_leaves_rng_and_mode_alone() -> None:
    model, x = tiny_vae(), histories()
    model.train()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = diagnose(model, x, CFG).to_metrics()
    assert torch.equal(torch.get_rng_state(), before) and model.training
    b = diagnose(model, x, CFG).to_metrics()
    assert a == b
    c = diagnose(model, x, CFG.model_copy(update={"seed": 1})).to_metrics()
    assert c != a


def test_anchor_distance_is_zero_when_the_mean_is_the_anchor_centroid() -> None:
    table = torch.randn(40, 4, generator=torch.Generator().manual_seed(0))
    r = diagnose(AnchorMean(table), histories(), CFG, anchors=table)
    assert r.anchor_distance == pytest.approx(0.0, abs=1e-5)
    far = diagnose(AnchorMean(table), histories(), CFG, anchors=table + 1.0)  # every anchor moved by (1, 1, 1, 1)
    assert far.anchor_distance == pytest.approx(2.0, abs=1e-5)
    assert "anchor_distance" not in diagnose(AnchorMean(table), histories(), CFG).to_metrics()


def test_groups_partition_the_sample() -> None:
    x = histories()
    counts = np.diff(x.indptr)
    groups = {"[5-10]": counts <= 8, "[11-50]": counts > 8}
    r = diagnose(tiny_vae(), x, CFG, groups=groups)
    m = r.to_metrics()
    assert m["group.5-10.users"] + m["group.11-50.users"] == 60
    assert {"group.11-50.drift", "group.11-50.knn_jaccard", "group.11-50.kl", "group.11-50.active_units"} <= set(m)


def test_point_posterior_model_reports_kl_not_applicable() -> None:
    torch.manual_seed(0)
    r = diagnose(MultiVAE(40, dae_config(latent_dim=6)), histories(), CFG)
    assert r.posterior == "point" and "kl" in r.not_applicable
    m = r.to_metrics()
    assert "kl_mean" not in m and m["drift"] > 0 and "near_w2_median" in m


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="only 120 users have a history"):
        diagnose(tiny_vae(), histories(), CFG.model_copy(update={"users": 500}))
    with pytest.raises(ValueError, match="neighbours"):
        diagnose(tiny_vae(), histories(), DiagnosticsConfig(users=5, neighbours=5))
    with pytest.raises(ValueError, match="anchors cover"):
        diagnose(tiny_vae(), histories(), CFG, anchors=torch.zeros(7, 6))
    with pytest.raises(ValidationError):
        DiagnosticsConfig(views=0)
    empty = histories().tolil()
    empty[:100] = 0
    with pytest.raises(ValueError, match="only 20 users"):
        diagnose(tiny_vae(), empty.tocsr(), CFG)  # users without a history are not sampled
