"""model.graph_step: the dense step is the sparse step's function (CPU); the CUDA graph trains (CUDA only)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from model.graph_step import dense_loss, dense_matrix
from model.pia import ItemAnchors, PIAConfig
from model.recommenders import make_recommender
from model.sparse import DeviceCSR
from model.split import Split
from model.train import TrainConfig, Trainer
from model.vae import MultiVAE, Phase, VAEConfig, dae_config

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _grads(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]


@pytest.mark.parametrize(("variational", "kl_weight"), [(True, "uniform"), (True, "count"), (False, "uniform")],
                         ids=["vae", "vae-kl-by-count", "dae"])
@pytest.mark.parametrize("estimator", ["closed_form", "sampled", None], ids=["pia-closed", "pia-sampled", "no-pia"])
def test_dense_loss_equals_the_sparse_loss_and_gradients(matrix: sp.csr_matrix, variational: bool, kl_weight: str,
                                                         estimator: str | None) -> None:
    torch.manual_seed(0)
    cfg = (VAEConfig(hidden_dims=(32,), latent_dim=8, kl_weight=kl_weight) if variational
           else dae_config(latent_dim=8))
    model = MultiVAE(matrix.shape[1], cfg)
    anchors = ItemAnchors(matrix.shape[1], 8, PIAConfig(weight=0.3, estimator=estimator)) if estimator else None
    params = [*model.parameters(), *([] if anchors is None else anchors.parameters())]
    csr = DeviceCSR.from_scipy(matrix)
    rows = torch.arange(37)
    rows[5] = rows[4]  # a repeated user, as padding makes
    batch = csr.batch(rows)
    step, lam, phase = 1234, 0.3, Phase("all", 1, 0.0, pia=True)  # dropout 0: the two paths draw the same noise

    torch.manual_seed(7)
    out = model.loss(batch, step=step, phase=phase)
    loss = out.loss
    if anchors is not None:
        loss = loss + lam * anchors.loss(batch.binary(), out.mu, out.logvar, out.z).mean()
    model.zero_grad()
    if anchors is not None:
        anchors.zero_grad()
    loss.backward()
    want = _grads(params)

    torch.manual_seed(7)
    x = dense_matrix(csr.indptr, csr.indices, (csr.n_rows, csr.n_cols)).index_select(0, rows).float()
    for p in params:
        p.grad = None
    terms = dense_loss(model, x, torch.ones(len(rows)), 0.0, torch.tensor(model.beta(step)), anchors,
                       torch.tensor(lam) if anchors is not None else None)
    terms["loss"].backward()
    assert torch.allclose(terms["loss"], loss, rtol=1e-5, atol=1e-6)
    for g, w in zip(_grads(params), want, strict=True):
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("kl_weight", ["uniform", "count"])
def test_padded_rows_do_not_count(matrix: sp.csr_matrix, kl_weight: str) -> None:
    torch.manual_seed(0)
    model = MultiVAE(matrix.shape[1], VAEConfig(hidden_dims=(32,), latent_dim=8, kl_weight=kl_weight)).eval()
    anchors = ItemAnchors(matrix.shape[1], 8, PIAConfig(weight=0.3))
    csr = DeviceCSR.from_scipy(matrix)
    x = dense_matrix(csr.indptr, csr.indices, (csr.n_rows, csr.n_cols)).float()
    real, padded = x[:10], torch.cat([x[:10], x[:6]])
    weight = torch.cat([torch.ones(10), torch.zeros(6)])
    beta, lam = torch.tensor(0.2), torch.tensor(0.3)
    torch.manual_seed(1)
    a = dense_loss(model, real, torch.ones(10), 0.0, beta, anchors, lam)
    torch.manual_seed(1)
    b = dense_loss(model, padded, weight, 0.0, beta, anchors, lam)  # same noise for the first 10 rows
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5), k


def test_dense_matrix_is_the_binary_csr(matrix: sp.csr_matrix) -> None:
    csr = DeviceCSR.from_scipy(matrix)
    d = dense_matrix(csr.indptr, csr.indices, (csr.n_rows, csr.n_cols))
    assert d.dtype == torch.uint8 and np.array_equal(d.numpy(), (matrix.toarray() > 0).astype(np.uint8))


def test_cuda_graph_refuses_what_it_cannot_do(split: Split) -> None:
    cfg = TrainConfig(epochs=1, device="cpu", cuda_graph=True, progress=False)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        Trainer(MultiVAE(split.train.shape[1], VAEConfig(hidden_dims=(32,), latent_dim=8)), split.train, cfg)


@needs_cuda
def test_cuda_graph_rejects_recvae_and_weighted_values(split: Split) -> None:
    cfg = TrainConfig(epochs=1, device="cuda", cuda_graph=True, progress=False)
    rec = make_recommender("recvae", train=cfg)
    with pytest.raises(ValueError, match="Multi-VAE/Multi-DAE only"):
        rec.fit(split.train, split.valid)
    weighted = split.train.copy()
    weighted.data = weighted.data * 2
    with pytest.raises(ValueError, match="binary"):
        Trainer(MultiVAE(split.train.shape[1]), weighted, cfg)


@needs_cuda
@pytest.mark.parametrize("bf16", [False, True])
def test_cuda_graph_training_learns_like_the_eager_loop(split: Split, bf16: bool) -> None:
    """Same data, seed and budget: the graph path learns (loss falls, validation NDCG near the eager one's)."""
    results = {}
    for graph in (False, True):
        cfg = TrainConfig(epochs=15, batch_size=40, device="cuda", cuda_graph=graph, bf16=bf16, progress=False)
        rec = make_recommender("multivae-pia", train=cfg, pia=PIAConfig(weight=0.3),
                               model_config=VAEConfig(hidden_dims=(32,), latent_dim=8))
        rec.fit(split.train, split.valid)
        hist = rec.history  # type: ignore[attr-defined]
        assert hist[-1]["loss"] < hist[0]["loss"] and np.isfinite(hist[-1]["anchor"])
        assert hist[0]["lambda_a"] == pytest.approx(0.3)
        results[graph] = max(r["val_ndcg@100"] for r in hist)
    assert results[True] > 0.8 * results[False]


@needs_cuda
def test_cuda_graph_warmup_leaves_no_trace(split: Split) -> None:
    """Capturing runs warm-up steps; they are undone: weights and Adam state equal the untrained ones."""
    torch.manual_seed(0)
    model = MultiVAE(split.train.shape[1], VAEConfig(hidden_dims=(32,), latent_dim=8))
    before = {k: v.clone().cuda() for k, v in model.state_dict().items()}
    cfg = TrainConfig(epochs=1, batch_size=40, device="cuda", cuda_graph=True, progress=False)
    trainer = Trainer(model, split.train, cfg)
    from tqdm import tqdm

    with tqdm(disable=True) as bar:
        trainer._run_graph_phase(Phase("all", 0, 0.5, pia=False), bar)  # zero passes: capture only
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    state = trainer.optimizers["all"].state
    assert all(float(t.abs().sum()) == 0.0 for s in state.values() for t in s.values() if torch.is_tensor(t))
