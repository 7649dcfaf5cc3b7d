"""model.recvae: composite prior, densely connected encoder, alternating encoder/decoder phases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy import stats
from scipy.special import logsumexp
from torch.nn import functional as F
from tqdm.auto import tqdm

from model.layers import log_normal_pdf
from model.recommenders import Autoencoder
from model.recvae import RecVAE, RecVAEConfig
from model.sparse import DeviceCSR, SparseBatch
from model.train import Trainer
from model.vae import Phase


def batch_of(m: sp.csr_matrix) -> SparseBatch:
    return DeviceCSR.from_scipy(m).batch(torch.arange(m.shape[0]))


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def all_changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(not torch.equal(a[k], b[k]) for k in a)


def test_log_normal_pdf_matches_scipy() -> None:
    torch.manual_seed(0)
    z, mu, logvar = torch.randn(5, 3), torch.randn(5, 3), torch.randn(5, 3)
    ref = stats.norm.logpdf(z.double().numpy(), mu.double().numpy(), np.exp(0.5 * logvar.double().numpy()))
    np.testing.assert_allclose(log_normal_pdf(z, mu, logvar).numpy(), ref, rtol=1e-5, atol=1e-5)


def test_composite_prior_matches_scipy(matrix: sp.csr_matrix, tiny_recvae: RecVAEConfig) -> None:
    torch.manual_seed(0)
    model = RecVAE(matrix.shape[1], tiny_recvae)
    with torch.no_grad():  # make the old encoder differ from the live one
        for p in model.encoder_old.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = batch_of(matrix[:20])
    z = torch.randn(20, 8) * 3
    got = model.log_prior(x, z)
    assert got.shape == (20, 8)
    with torch.no_grad():
        model.encoder_old.eval()
        old_mu, old_logvar = (t.double().numpy() for t in model.encoder_old(x, 0.0))
    zd = z.double().numpy()
    parts = np.stack(
        [
            np.log(0.15) + stats.norm.logpdf(zd, 0.0, 1.0),
            np.log(0.75) + stats.norm.logpdf(zd, old_mu, np.exp(0.5 * old_logvar)),
            np.log(0.10) + stats.norm.logpdf(zd, 0.0, math.exp(0.5 * 10.0)),
        ]
    )
    np.testing.assert_allclose(got.numpy(), logsumexp(parts, axis=0), rtol=1e-5, atol=1e-5)
    # it uses the *old* encoder: the live encoder's posterior gives another density
    with torch.no_grad():
        mu, logvar = model.encoder(x, 0.0)
    live = np.log(0.75) + stats.norm.logpdf(zd, mu.double().numpy(), np.exp(0.5 * logvar.double().numpy()))
    assert not np.allclose(logsumexp(np.stack([parts[0], live, parts[2]]), axis=0), got.numpy(), atol=1e-3)


def test_encoder_is_densely_connected(matrix: sp.csr_matrix, tiny_recvae: RecVAEConfig) -> None:
    torch.manual_seed(0)
    model = RecVAE(matrix.shape[1], tiny_recvae)
    enc = model.encoder
    assert len(enc.lns) == 5 and all(isinstance(ln, torch.nn.LayerNorm) for ln in enc.lns)
    assert all(ln.eps == pytest.approx(0.1) for ln in enc.lns)
    assert len(enc.fcs) == 4 and all((fc.in_features, fc.out_features) == (32, 32) for fc in enc.fcs)
    x = batch_of(matrix[:16])
    with torch.no_grad():
        mu, logvar = enc(x, 0.0)
        # reference (Shenbin et al.): h_k = LN_k(swish(fc_k(h_{k-1}) + h_1 + ... + h_{k-1}))
        dense = torch.from_numpy(matrix[:16].toarray())
        h = [enc.lns[0](F.silu(F.normalize(dense, dim=1) @ enc.fc1.weight + enc.fc1.bias))]
        for fc, ln in zip(enc.fcs, enc.lns[1:], strict=True):
            h.append(ln(F.silu(fc(h[-1]) + sum(h))))
        torch.testing.assert_close(mu, enc.fc_mu(h[-1]), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(logvar, enc.fc_logvar(h[-1]), rtol=1e-4, atol=1e-5)
        # every layer matters
        layers = [enc.fc1, *enc.fcs, *enc.lns]
        for layer in layers:
            w = layer.weight
            saved = w.clone()
            w.mul_(1.5).add_(0.05)
            assert not torch.allclose(enc(x, 0.0)[0], mu, atol=1e-4), layer
            w.copy_(saved)
        # with fc2..fc5 zeroed, the skip connections still carry the input to the output
        for fc in enc.fcs:
            fc.weight.zero_()
            fc.bias.zero_()
        out = enc(x, 0.0)[0]
        assert not torch.allclose(out[0], out[1], atol=1e-4)


def test_phases_and_param_groups(tiny_recvae: RecVAEConfig) -> None:
    model = RecVAE(30, tiny_recvae)
    assert model.phases() == [Phase("encoder", 3, 0.5, pia=True), Phase("decoder", 1, 0.0, pia=False)]
    groups = model.param_groups()
    assert {id(p) for p in groups["encoder"]} == {id(p) for p in model.encoder.parameters()}
    assert {id(p) for p in groups["decoder"]} == {id(p) for p in model.decoder.parameters()}
    assert not any(p.requires_grad for p in model.encoder_old.parameters())
    ref = RecVAEConfig()  # reference hyperparameters
    assert (ref.hidden_dim, ref.latent_dim, ref.dropout, ref.encoder_passes, ref.decoder_passes) == (
        600,
        200,
        0.5,
        3,
        1,
    )
    assert ref.mixture_weights == (0.15, 0.75, 0.1) and ref.uniform_logvar == 10.0
    assert (model.decoder.in_features, model.decoder.out_features) == (8, 30)  # linear decoder d -> I


def test_phase_updates_touch_only_their_group(matrix: sp.csr_matrix, tiny_recvae, train_config) -> None:
    torch.manual_seed(0)
    model = RecVAE(matrix.shape[1], tiny_recvae)
    trainer = Trainer(model, matrix, train_config())
    enc_phase, dec_phase = model.phases()
    bar = tqdm(disable=True)
    assert same(snapshot(model.encoder_old), snapshot(model.encoder))  # a deep copy at construction

    enc0, dec0, old0 = snapshot(model.encoder), snapshot(model.decoder), snapshot(model.encoder_old)
    means = trainer._run_phase(dec_phase, bar)
    assert np.isfinite(means["loss"])
    assert same(snapshot(model.encoder), enc0) and same(snapshot(model.encoder_old), old0)
    assert all_changed(snapshot(model.decoder), dec0)
    assert trainer.step == 0  # decoder updates do not advance the schedules

    enc1, dec1 = snapshot(model.encoder), snapshot(model.decoder)
    trainer._run_phase(enc_phase, bar)
    assert same(snapshot(model.decoder), dec1)
    enc2 = snapshot(model.encoder)
    assert not same(enc2, enc1)
    assert same(snapshot(model.encoder_old), old0)  # the prior is refreshed only at the end of the phase
    assert trainer.step == 3 * 4  # 3 passes × 4 batches
    model.end_phase(enc_phase)
    assert same(snapshot(model.encoder_old), enc2)
    model.end_phase(dec_phase)  # no-op
    assert same(snapshot(model.encoder_old), enc2)


def test_one_epoch_fit_refreshes_the_prior(matrix: sp.csr_matrix, tiny_recvae, train_config) -> None:
    torch.manual_seed(0)
    model = RecVAE(matrix.shape[1], tiny_recvae)
    old0 = snapshot(model.encoder_old)
    history = Trainer(model, matrix, train_config(epochs=1)).fit()
    assert not same(snapshot(model.encoder_old), old0)
    assert same(snapshot(model.encoder_old), snapshot(model.encoder))  # the decoder phase leaves the encoder
    rec = history[0]
    assert {"loss", "nll", "kl", "decoder_loss", "decoder_nll"} <= rec.keys()
    assert rec["step"] == 12


def test_kl_weight_is_gamma_times_history_size(tiny_recvae) -> None:
    # gamma = 0 removes the KL: the loss is the plain multinomial NLL of the sampled z
    x = batch_of(sp.csr_matrix(np.eye(6, 30, dtype=np.float32) * 2 + np.eye(6, 30, k=3, dtype=np.float32)))
    phase = Phase("encoder", 1, 0.0, pia=True)
    torch.manual_seed(0)
    model = RecVAE(30, tiny_recvae)
    cfg0 = tiny_recvae.model_copy(update={"gamma": 0.0})
    model0 = RecVAE(30, cfg0)
    model0.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.manual_seed(1)
        out = model.loss(x, step=0, phase=phase)
        torch.manual_seed(1)
        out0 = model0.loss(x, step=0, phase=phase)
    assert float(out0.loss) == pytest.approx(float(out0.terms["nll"]), rel=1e-6)
    # same z: loss - loss0 = mean_u gamma * |x_u| * kl_u; every |x_u| is 3 here
    assert torch.equal(out.z, out0.z)
    expected = tiny_recvae.gamma * 3.0 * float(out.terms["kl"])
    assert float(out.loss) - float(out0.loss) == pytest.approx(expected, rel=1e-4)


def test_inference_state_has_no_old_encoder(matrix: sp.csr_matrix, tiny_recvae, train_config) -> None:
    rec = Autoencoder("recvae", tiny_recvae, train_config(epochs=1)).fit(matrix)
    state = rec.inference_state()
    assert not any(k.startswith("encoder_old") for k in state)
    assert any(k.startswith("encoder_old") for k in rec.module.state_dict())
    expected = {f"encoder.{k}" for k in rec.module.encoder.state_dict()} | {"decoder.weight", "decoder.bias"}
    assert set(state) == expected
    assert all(v.device.type == "cpu" for v in state.values())
