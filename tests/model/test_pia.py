"""model.pia: the anchor loss (closed form and sampled), schedules, init, gradients, and the claim that PIA
costs nothing at inference."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from model.pia import ItemAnchors, PIAConfig, pia_weight
from model.recommenders import Autoencoder, make_recommender
from model.recvae import RecVAE
from model.sparse import DeviceCSR, SparseBatch, as_batch
from model.train import Trainer
from model.vae import MultiVAE

HISTORIES = [[1, 3, 5], [0], [], [2, 4, 6, 8, 9]]  # user 2 has no history
N_ITEMS, DIM = 10, 4


def history_batch(histories: list[list[int]] = HISTORIES, n_items: int = N_ITEMS) -> SparseBatch:
    rows = [r for r, items in enumerate(histories) for _ in items]
    cols = [i for items in histories for i in items]
    m = sp.csr_matrix((np.ones(len(cols), np.float32), (rows, cols)), shape=(len(histories), n_items))
    return DeviceCSR.from_scipy(m).batch(torch.arange(len(histories)))


def anchors_with(weight: torch.Tensor, **cfg: object) -> ItemAnchors:
    a = ItemAnchors(weight.shape[0], weight.shape[1], PIAConfig(weight=1.0, **cfg))  # type: ignore[arg-type]
    with torch.no_grad():
        a.weight.copy_(weight)
    return a


@pytest.fixture
def posterior() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    e = torch.randn(N_ITEMS, DIM, generator=g) + 0.5
    mu = torch.randn(len(HISTORIES), DIM, generator=g)
    logvar = torch.rand(len(HISTORIES), DIM, generator=g) * 2 - 1
    return e, mu, logvar


def explicit_closed_form(e: np.ndarray, mu: np.ndarray, logvar: np.ndarray) -> list[float]:
    """||mu - c||^2 + tr(Sigma) + mean_i ||e_i - c||^2, with loops, in float64."""
    out = []
    for u, items in enumerate(HISTORIES):
        if not items:
            out.append(0.0)
            continue
        c = np.zeros(e.shape[1])
        for i in items:
            c += e[i]
        c /= len(items)
        pull = sum((mu[u, k] - c[k]) ** 2 for k in range(e.shape[1]))
        trace = sum(np.exp(logvar[u, k]) for k in range(e.shape[1]))
        spread = sum(sum((e[i, k] - c[k]) ** 2 for k in range(e.shape[1])) for i in items) / len(items)
        out.append(pull + trace + spread)
    return out


def test_closed_form_equals_explicit_formula(posterior) -> None:
    e, mu, logvar = posterior
    got = anchors_with(e).loss(history_batch(), mu, logvar)
    ref = explicit_closed_form(e.double().numpy(), mu.double().numpy(), logvar.double().numpy())
    np.testing.assert_allclose(got.detach().numpy(), ref, rtol=1e-5, atol=1e-5)
    # the closed form ignores a sample z when one is passed
    z = mu + 3.0
    torch.testing.assert_close(anchors_with(e).loss(history_batch(), mu, logvar, z), got)


def test_closed_form_equals_monte_carlo_expectation(posterior) -> None:
    e, mu, logvar = (t.double() for t in posterior)
    got = anchors_with(e.float()).loss(history_batch(), mu.float(), logvar.float()).detach().double()
    g = torch.Generator().manual_seed(1)
    n = 200_000
    for u, items in enumerate(HISTORIES):
        if not items:
            continue
        z = mu[u] + torch.randn(n, DIM, generator=g, dtype=torch.float64) * (0.5 * logvar[u]).exp()  # [n, d]
        mc = (z[:, None, :] - e[items][None]).pow(2).sum(-1).mean()  # mean_i E||z - e_i||^2
        assert float(got[u]) == pytest.approx(float(mc), rel=1e-2), u


def test_sampled_estimator_is_exact_for_the_given_z(posterior) -> None:
    e, mu, logvar = posterior
    z = mu + torch.randn_like(mu)
    got = anchors_with(e, estimator="sampled").loss(history_batch(), mu, logvar, z).detach()
    for u, items in enumerate(HISTORIES):
        ref = float((z[u] - e[items]).pow(2).sum(-1).mean()) if items else 0.0
        assert float(got[u]) == pytest.approx(ref, rel=1e-5, abs=1e-5)
    # without a sample the sampled estimator falls back to the closed form
    closed = anchors_with(e).loss(history_batch(), mu, logvar)
    torch.testing.assert_close(anchors_with(e, estimator="sampled").loss(history_batch(), mu, logvar), closed)


def test_no_logvar_drops_the_trace_term(posterior) -> None:
    e, mu, logvar = posterior
    a = anchors_with(e)
    diff = a.loss(history_batch(), mu, logvar) - a.loss(history_batch(), mu, None)
    expected = logvar.exp().sum(-1) * torch.tensor([1.0, 1.0, 0.0, 1.0])
    torch.testing.assert_close(diff, expected, rtol=1e-5, atol=1e-5)


def test_empty_history_gives_zero_and_no_gradient(posterior) -> None:
    e, mu, logvar = posterior
    mu = mu.clone().requires_grad_(True)
    loss = anchors_with(e).loss(history_batch(), mu, logvar)
    assert float(loss.detach()[2]) == 0.0
    assert bool((loss[[0, 1, 3]] > 0).all())
    loss.sum().backward()
    assert torch.equal(mu.grad[2], torch.zeros(DIM))
    only_empty = anchors_with(e).loss(history_batch([[], []]), mu[:2].detach(), logvar[:2])
    assert torch.equal(only_empty, torch.zeros(2))


def test_pia_weight_schedules() -> None:
    const = PIAConfig(weight=0.3)
    assert [pia_weight(const, s) for s in (0, 10, 10**6)] == [0.3, 0.3, 0.3]
    lin = PIAConfig(weight=0.4, schedule="linear", warmup_steps=100)
    assert pia_weight(lin, 0) == 0.0
    assert pia_weight(lin, 25) == pytest.approx(0.1)
    assert pia_weight(lin, 50) == pytest.approx(0.2)
    assert pia_weight(lin, 100) == pytest.approx(0.4)
    assert pia_weight(lin, 10**6) == pytest.approx(0.4)
    assert pia_weight(PIAConfig(weight=0.4, schedule="linear", warmup_steps=0), 0) == pytest.approx(0.4)
    assert not PIAConfig().enabled and PIAConfig(weight=1e-6).enabled
    with pytest.raises(ValueError):
        PIAConfig(weight=-1.0)


def test_trainer_applies_the_schedule(matrix: sp.csr_matrix, tiny_vae, train_config) -> None:
    torch.manual_seed(0)
    pia = PIAConfig(weight=0.8, schedule="linear", warmup_steps=8)
    trainer = Trainer(MultiVAE(matrix.shape[1], tiny_vae), matrix, train_config(epochs=3), pia)
    history = trainer.fit()  # 4 updates per epoch: steps 0-3, 4-7, 8-11
    lam = [r["lambda_a"] for r in history]
    assert lam == pytest.approx([0.8 * np.mean([0, 1, 2, 3]) / 8, 0.8 * np.mean([4, 5, 6, 7]) / 8, 0.8])


def test_init_normal_and_zeros() -> None:
    torch.manual_seed(0)
    a = ItemAnchors(2000, 16, PIAConfig(weight=1.0, init="normal", init_std=0.05))
    assert a.weight.shape == (2000, 16)
    assert float(a.weight.detach().std()) == pytest.approx(0.05, rel=0.03)
    assert abs(float(a.weight.detach().mean())) < 0.005
    z = ItemAnchors(20, 4, PIAConfig(weight=1.0, init="zeros"))
    assert torch.equal(z.weight.detach(), torch.zeros(20, 4))


@pytest.mark.parametrize("arch", ["multivae", "recvae"])
def test_init_from_encoder_is_the_one_hot_posterior_mean(arch: str, tiny_vae, tiny_recvae) -> None:
    torch.manual_seed(0)
    n_items = 23
    model = MultiVAE(n_items, tiny_vae) if arch == "multivae" else RecVAE(n_items, tiny_recvae)
    model.eval()
    a = ItemAnchors(n_items, 8, PIAConfig(weight=1.0, init="encoder"))
    a.init_from_encoder(lambda b: model.encode(b)[0], batch=5)  # several chunks, the last one short
    with torch.no_grad():
        ref = model.encode(as_batch(torch.eye(n_items)))[0]
    torch.testing.assert_close(a.weight.detach(), ref, rtol=1e-5, atol=1e-6)
    assert len({tuple(r) for r in a.weight.detach().numpy().round(5).tolist()}) == n_items  # distinct anchors


def test_trainer_encoder_init(matrix: sp.csr_matrix, tiny_vae, train_config) -> None:
    torch.manual_seed(0)
    model = MultiVAE(matrix.shape[1], tiny_vae)
    with torch.no_grad():
        model.eval()
        ref = model.encode(as_batch(torch.eye(matrix.shape[1])))[0]
        model.train()
    trainer = Trainer(model, matrix, train_config(), PIAConfig(weight=1.0, init="encoder"))
    assert trainer.anchors is not None
    torch.testing.assert_close(trainer.anchors.weight.detach(), ref, rtol=1e-5, atol=1e-6)


def test_gradients_reach_anchors_and_encoder(tiny_vae) -> None:
    torch.manual_seed(0)
    model = MultiVAE(N_ITEMS, tiny_vae)
    anchors = ItemAnchors(N_ITEMS, 8, PIAConfig(weight=1.0))
    hist = history_batch([[1, 3, 5], [0], [], [2, 4, 6]])
    mu, logvar = model.encode(hist, dropout=0.5)
    anchors.loss(hist, mu, logvar).mean().backward()
    grad = anchors.weight.grad
    used = [0, 1, 2, 3, 4, 5, 6]
    assert bool((grad[used].abs().sum(-1) > 0).all())
    assert torch.equal(grad[[7, 8, 9]], torch.zeros(3, 8))  # no history touches items 7-9
    assert float(model.item_in.weight.grad.abs().sum()) > 0
    assert float(model.encoder[0].weight.grad.abs().sum()) > 0
    assert all(p.grad is None for p in model.decoder.parameters())  # the anchor loss never sees the decoder


def test_trainer_optimizes_the_anchors(matrix: sp.csr_matrix, tiny_vae, tiny_recvae, train_config) -> None:
    torch.manual_seed(0)
    trainer = Trainer(MultiVAE(matrix.shape[1], tiny_vae), matrix, train_config(epochs=1), PIAConfig(weight=1.0))
    before = trainer.anchors.weight.detach().clone()
    trainer.fit()
    assert not torch.equal(before, trainer.anchors.weight.detach())
    # RecVAE: the anchors train with the encoder, not with the decoder
    rt = Trainer(RecVAE(matrix.shape[1], tiny_recvae), matrix, train_config(epochs=1), PIAConfig(weight=1.0))
    in_group = {g: any(p is rt.anchors.weight for p in o.param_groups[0]["params"]) for g, o in rt.optimizers.items()}
    assert in_group == {"encoder": True, "decoder": False}


# -- zero inference cost --------------------------------------------------------------------------
MODEL_CONFIGS = {"multivae": "tiny_vae", "recvae": "tiny_recvae"}


@pytest.mark.parametrize("arch", ["multivae", "recvae"])
def test_pia_has_zero_inference_cost(arch: str, split, train_config, request) -> None:
    cfg = request.getfixturevalue(MODEL_CONFIGS[arch])
    train = train_config(epochs=2)
    plain = make_recommender(arch, train=train, model_config=cfg).fit(split.train, split.valid)
    pia = PIAConfig(weight=1.0, init="zeros")  # zeros: draws no random numbers, so only the loss differs
    with_pia = make_recommender(f"{arch}-pia", train=train, pia=pia, model_config=cfg).fit(split.train, split.valid)
    assert isinstance(plain, Autoencoder) and isinstance(with_pia, Autoencoder)
    assert with_pia.pia.enabled and not plain.pia.enabled
    s_plain, s_pia = plain.inference_state(), with_pia.inference_state()
    assert {k: tuple(v.shape) for k, v in s_plain.items()} == {k: tuple(v.shape) for k, v in s_pia.items()}
    assert not any("anchor" in k for k in s_pia)
    names = [n for n, _ in with_pia.module.named_parameters()] + [n for n, _ in with_pia.module.named_buffers()]
    assert not any("anchor" in n for n in names)
    assert sum(p.numel() for p in with_pia.module.parameters()) == sum(p.numel() for p in plain.module.parameters())
    # PIA really changed training: same seed, different weights
    assert any(not torch.equal(s_plain[k], s_pia[k]) for k in s_plain)


@pytest.mark.parametrize("arch", ["multivae", "recvae"])
def test_scores_do_not_depend_on_the_anchors(arch: str, split, tiny_vae, tiny_recvae, train_config) -> None:
    torch.manual_seed(0)
    n_items = split.train.shape[1]
    model = MultiVAE(n_items, tiny_vae) if arch == "multivae" else RecVAE(n_items, tiny_recvae)
    trainer = Trainer(model, split.train, train_config(epochs=1), PIAConfig(weight=1.0))
    trainer.fit()
    hist = DeviceCSR.from_scipy(split.valid.fold_in).batch(torch.arange(split.valid.n_users))
    before = model.score(hist)
    with torch.no_grad():
        trainer.anchors.weight.normal_(0.0, 100.0)
    assert torch.equal(model.score(hist), before)
