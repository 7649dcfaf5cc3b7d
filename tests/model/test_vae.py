"""model.vae / model.layers: Multi-VAE and Multi-DAE (Liang et al. 2018) against dense references."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch.nn import functional as F

from model.layers import ItemInput, gaussian_kl, multinomial_nll
from model.sparse import DeviceCSR, SparseBatch, as_batch
from model.train import Trainer
from model.vae import MultiVAE, Phase, VAEConfig, dae_config


def batch_of(m: sp.csr_matrix) -> SparseBatch:
    return DeviceCSR.from_scipy(m).batch(torch.arange(m.shape[0]))


def weighted_matrix(n_rows: int = 12, n_cols: int = 30, seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    dense = np.where(rng.random((n_rows, n_cols)) < 0.25, rng.uniform(0.5, 4.0, (n_rows, n_cols)), 0.0)
    dense[3] = 0.0  # an empty row
    return sp.csr_matrix(dense.astype(np.float32))


def test_item_input_equals_dense_linear() -> None:
    torch.manual_seed(0)
    layer = ItemInput(30, 16)
    m = weighted_matrix()
    dense = torch.from_numpy(m.toarray())
    ref = F.linear(dense, layer.weight.T, layer.bias)
    torch.testing.assert_close(layer(batch_of(m)), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer(dense), ref, rtol=1e-5, atol=1e-6)  # dense input accepted too
    torch.testing.assert_close(layer(batch_of(m))[3], layer.bias)  # empty row: bias only
    # same gradients as the dense layer
    layer(batch_of(m)).pow(2).sum().backward()
    g_sparse = layer.weight.grad.clone()
    w = layer.weight.detach().clone().requires_grad_(True)
    F.linear(dense, w.T, layer.bias.detach()).pow(2).sum().backward()
    torch.testing.assert_close(g_sparse, w.grad, rtol=1e-5, atol=1e-6)


def dims(layers: torch.nn.ModuleList) -> list[tuple[int, int]]:
    return [(lin.in_features, lin.out_features) for lin in layers]


def test_multivae_reference_shapes() -> None:
    n_items = 50
    model = MultiVAE(n_items)  # reference config: I -> 600 -> 2x200, 200 -> 600 -> I
    assert model.config == VAEConfig() and model.latent_dim == 200
    assert tuple(model.item_in.weight.shape) == (n_items, 600) and tuple(model.item_in.bias.shape) == (600,)
    assert dims(model.encoder) == [(600, 400)]
    assert dims(model.decoder) == [(200, 600), (600, n_items)]
    b = batch_of(weighted_matrix(7, n_items))
    mu, logvar = model.encode(b)
    assert mu.shape == (7, 200) and logvar is not None and logvar.shape == (7, 200)
    assert model.score(b).shape == (7, n_items)
    cfg = model.config
    assert (cfg.dropout, cfg.beta_max, cfg.anneal_steps, cfg.variational) == (0.5, 0.2, 200_000, True)
    assert model.phases() == [Phase("all", 1, 0.5, pia=True)]


def test_multidae_reference_shapes() -> None:
    n_items = 50
    model = MultiVAE(n_items, dae_config())  # I -> 200 -> I
    assert tuple(model.item_in.weight.shape) == (n_items, 200)
    assert len(model.encoder) == 0
    assert dims(model.decoder) == [(200, n_items)]
    code, logvar = model.encode(batch_of(weighted_matrix(5, n_items)))
    assert code.shape == (5, 200) and logvar is None
    with torch.no_grad():
        model.item_in.weight.mul_(100.0)  # large pre-activations: the tanh keeps the code in [-1, 1]
        code, _ = model.encode(batch_of(weighted_matrix(5, n_items)))
    assert float(code.abs().max()) <= 1.0 and float(code.abs().max()) > 0.9
    assert model.beta(10**9) == 0.0
    out = model.loss(batch_of(weighted_matrix(5, n_items)), step=0, phase=model.phases()[0])
    assert set(out.terms) == {"nll"} and out.logvar is None and out.z is None


def test_variational_without_hidden_layers_has_two_heads() -> None:
    model = MultiVAE(30, VAEConfig(hidden_dims=(), latent_dim=8))
    assert tuple(model.item_in.weight.shape) == (30, 16)
    assert dims(model.decoder) == [(8, 30)]
    mu, logvar = model.encode(batch_of(weighted_matrix()))
    assert mu.shape == logvar.shape == (12, 8)


@pytest.mark.parametrize("cfg", [VAEConfig(hidden_dims=(32,), latent_dim=8), dae_config(latent_dim=8)], ids=["vae", "dae"])
def test_score_is_deterministic_and_uses_the_mean(cfg: VAEConfig) -> None:
    torch.manual_seed(0)
    model = MultiVAE(30, cfg)
    b = batch_of(weighted_matrix())
    model.train()
    s1, s2 = model.score(b), model.score(b)
    assert torch.equal(s1, s2)
    assert model.training  # the mode is restored
    assert not s1.requires_grad
    # reference: no input dropout, z = mu
    model.eval()
    with torch.no_grad():
        mu, _ = model.encode(b, dropout=0.0)
        ref = model.decode(mu)
    torch.testing.assert_close(s1, ref, rtol=0, atol=0)
    torch.testing.assert_close(model.score(torch.from_numpy(weighted_matrix().toarray())), ref, rtol=1e-5, atol=1e-6)
    # a training forward (dropout on the input) differs, which shows the dropout is really off in score()
    model.train()
    torch.manual_seed(1)
    mu_train, _ = model.encode(b, dropout=0.5)
    assert not torch.allclose(mu_train, mu)


def test_multinomial_nll_equals_dense_formula() -> None:
    torch.manual_seed(0)
    m = weighted_matrix()
    logits = torch.randn(12, 30) * 3
    ref = -(F.log_softmax(logits, dim=-1) * torch.from_numpy(m.toarray())).sum(-1)
    torch.testing.assert_close(multinomial_nll(logits, batch_of(m)), ref, rtol=1e-5, atol=1e-5)
    assert float(multinomial_nll(logits, batch_of(m))[3]) == 0.0  # empty history: no term


def test_gaussian_kl_closed_form() -> None:
    torch.manual_seed(0)
    mu, logvar = torch.randn(6, 5), torch.randn(6, 5)
    ref = 0.5 * (logvar.exp() + mu**2 - 1.0 - logvar).sum(-1)
    torch.testing.assert_close(gaussian_kl(mu, logvar), ref)
    dist = torch.distributions
    ref2 = dist.kl_divergence(dist.Normal(mu, (0.5 * logvar).exp()), dist.Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(gaussian_kl(mu, logvar), ref2, rtol=1e-5, atol=1e-5)
    assert torch.equal(gaussian_kl(torch.zeros(3, 4), torch.zeros(3, 4)), torch.zeros(3))
    assert bool((gaussian_kl(mu, logvar) > 0).all())


def test_beta_annealing() -> None:
    model = MultiVAE(10, VAEConfig(hidden_dims=(), latent_dim=2, beta_max=0.2, beta_schedule="liang", anneal_steps=1000))
    assert model.beta(0) == 0.0
    assert model.beta(100) == pytest.approx(0.1)
    assert model.beta(150) == pytest.approx(0.15)
    assert model.beta(200) == pytest.approx(0.2)
    assert model.beta(10**6) == pytest.approx(0.2)
    assert MultiVAE(10, VAEConfig(hidden_dims=(), latent_dim=2, anneal_steps=0)).beta(0) == pytest.approx(0.2)
    # the loss uses beta(step): loss = nll + beta * kl
    b = batch_of(weighted_matrix(12, 10))
    torch.manual_seed(0)
    out = model.loss(b, step=150, phase=Phase("all", 1, 0.5, pia=True))
    assert out.terms["beta"] == pytest.approx(0.15)
    expected = float(out.terms["nll"]) + 0.15 * float(out.terms["kl"])
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-5)
    assert out.z is not None and out.mu is not None and out.logvar is not None


@pytest.mark.parametrize(
    "cfg",
    [VAEConfig(hidden_dims=(32,), latent_dim=8, anneal_steps=1000), dae_config(latent_dim=8)],
    ids=["vae", "dae"],
)
def test_training_decreases_the_loss(cfg: VAEConfig, matrix: sp.csr_matrix, train_config) -> None:
    torch.manual_seed(0)
    model = MultiVAE(matrix.shape[1], cfg)
    trainer = Trainer(model, matrix, train_config(epochs=50, lr=3e-3))  # 160 users / 40 = 4 updates per epoch
    history = trainer.fit()
    assert len(history) == 50 and history[-1]["step"] == 200
    first = history[0]["nll"]
    last = np.mean([r["nll"] for r in history[-5:]])
    assert last < 0.93 * first, (first, last)
    # the annealed beta grew with the step count
    if cfg.variational:
        assert history[0]["beta"] < history[-1]["beta"] <= 0.2
    # the trained model reconstructs a user's own items better than chance
    scores = model.score(as_batch(torch.from_numpy(matrix[:50].toarray())))
    seen = torch.from_numpy(matrix[:50].toarray()) > 0
    assert float(scores[seen].mean()) > float(scores[~seen].mean())
