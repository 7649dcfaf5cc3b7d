"""Data-parallel training (model.distributed through model.train.Trainer) is the single-process model.

Two real processes (torch.multiprocessing spawn, gloo on 127.0.0.1) against one process on the same users:
one optimiser step over 2 ranks x 250 users equals one step over the 500 users (gradients and weights, PIA
anchors included), for Multi-VAE + PIA and RecVAE + PIA; unequal shards (a last, short batch) are weighted
exactly; a checkpoint resumed on both ranks reproduces the uninterrupted data-parallel run.

The step tests replace the reparameterisation noise by zeros (z = mu) and set input dropout to 0, in both runs:
each rank draws its own noise for its own users, which cannot equal one process's draw for all 500 users, so
with sampling on the two runs differ by their noise, not by the data-parallel arithmetic that is under test.
Everything else (NLL, KL at beta > 0, tr(Sigma), the anchors, Adam) is the real code.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model.distributed import DataParallel
from model.pia import PIAConfig
from model.recvae import RecVAE, RecVAEConfig
from model.split import strong_generalization_split
from model.train import TrainConfig, Trainer
from model.vae import MultiVAE, VAEConfig

N_USERS, N_ITEMS = 500, 60
PIA = PIAConfig(weight=0.5)


def data() -> sp.csr_matrix:
    """500 users x 60 items, 3 to 15 distinct items each, popular items likelier (the same in every process)."""
    rng = np.random.default_rng(3)
    p = 1.0 / np.arange(1, N_ITEMS + 1)
    rows, cols = [], []
    for u in range(N_USERS):
        items = rng.choice(N_ITEMS, size=int(rng.integers(3, 16)), replace=False, p=p / p.sum())
        rows += [u] * len(items)
        cols += items.tolist()
    return sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(N_USERS, N_ITEMS))


def build(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "multivae":
        return MultiVAE(N_ITEMS, VAEConfig(hidden_dims=(32,), latent_dim=8, dropout=0.0, anneal_steps=0))
    return RecVAE(N_ITEMS, RecVAEConfig(hidden_dim=32, latent_dim=8, dropout=0.0))


def step_case(arch: str, batch_size: int) -> dict[str, Any]:
    """One epoch without noise: the gradients of its last step and the weights after it."""
    cfg = TrainConfig(epochs=1, batch_size=batch_size, lr=1e-2, device="cpu", progress=False)
    with mock.patch("torch.randn_like", torch.zeros_like):
        t = Trainer(build(arch), data(), cfg, PIA)
        t.fit()
    assert t.anchors is not None
    last_group = t.ae.phases()[-1].group
    reduced = {id(p) for g in t.optimizers[last_group].param_groups for p in g["params"]}
    named = [*(("model." + k, p) for k, p in t.model.named_parameters()), ("anchors.weight", t.anchors.weight)]
    return {"params": {k: p.detach().clone() for k, p in named},
            "grads": {k: p.grad.clone() for k, p in named if id(p) in reduced and p.grad is not None},
            "history": [{k: v for k, v in r.items() if k != "train_seconds"} for r in t.history], "step": t.step}


def resume_case(ckpt: Path, ema_halflife: float | None = None) -> dict[str, Any]:
    """4 epochs with noise and validation, uninterrupted; then a fresh trainer resumed from epoch 2's checkpoint."""
    split = strong_generalization_split(data(), seed=0, n_valid=50, n_test=50)
    cfg = TrainConfig(epochs=4, batch_size=64, device="cpu", progress=False, ema_halflife=ema_halflife)

    def trainer(seed: int) -> Trainer:
        torch.manual_seed(seed)
        # beta rises over the whole run ("progress" over all planned updates): the checkpoint is taken mid-ramp
        vae = VAEConfig(hidden_dims=(32,), latent_dim=8, beta_schedule="progress", anneal_fraction=1.0)
        return Trainer(MultiVAE(N_ITEMS, vae), split.train, cfg, PIA, split.valid)

    def save(state: dict[str, Any]) -> None:
        if state["epoch"] == 2:
            torch.save(state, ckpt)

    full = trainer(0)
    full.fit(checkpoint=save)
    dist.barrier()  # rank 0 has written the checkpoint
    resumed = trainer(123)  # other weights: everything must come from the checkpoint
    resumed.load_state_dict(torch.load(ckpt, weights_only=False))
    resumed.fit()
    out = {}
    for name, t in (("full", full), ("resumed", resumed)):
        assert t.anchors is not None
        out[name] = {"model": t.model.state_dict(), "anchors": t.anchors.weight.detach().clone(),
                     "history": [{k: v for k, v in r.items() if k != "train_seconds"} for r in t.history],
                     "best_epoch": t.best_epoch, "planned": (t.planned_updates, t.model.planned_updates)}
    return out


CASES: dict[str, tuple[str, tuple]] = {  # name: (case, args); every case runs in one spawn of the two ranks
    "multivae": ("step", ("multivae", N_USERS)),  # 1 global batch of 500: one Adam step
    "recvae": ("step", ("recvae", N_USERS)),  # 1 global batch: 3 encoder steps, then 1 decoder step
    "uneven": ("step", ("multivae", 175)),  # 175, 175, 150 users: shards 88/87, 88/87, 75/75
    "resume": ("resume", ()),
    "resume-ema": ("resume", (1.0,)),  # with the weights' moving average: validated, kept and resumed alike
}


def rank_main(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        assert DataParallel.current() == DataParallel(rank, world)
        results = {name: step_case(*args) if case == "step" else resume_case(Path(out) / f"{name}.pt", *args)
                   for name, (case, args) in CASES.items()}
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Every case's results on each of 2 ranks (one spawn: starting the processes costs more than the cases)."""
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(rank_main, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def assert_tensors_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], **tol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=lambda m, k=k: f"{k}: {m}", **tol)


@pytest.mark.parametrize("arch", ["multivae", "recvae"])
def test_one_step_on_2_ranks_of_250_users_is_the_step_on_500(arch: str, ranks: list[dict[str, Any]]) -> None:
    one = step_case(arch, batch_size=N_USERS)  # 1 global batch: Multi-VAE 1 step, RecVAE 3 encoder + 1 decoder
    ranks = [r[arch] for r in ranks]
    assert one["step"] == ranks[0]["step"] == ranks[1]["step"]
    assert "anchors.weight" in one["grads"] or arch == "recvae"  # RecVAE's last step is its decoder's
    for r in ranks:
        assert_tensors_close(r["grads"], one["grads"], rtol=1e-5, atol=1e-7)
        assert_tensors_close(r["params"], one["params"], rtol=1e-5, atol=1e-6)  # anchors included
        # the logged per-epoch means are the global batch's, not one rank's
        for k, v in one["history"][0].items():
            assert r["history"][0][k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
    for k in ranks[0]["params"]:  # and the ranks hold the very same weights
        assert torch.equal(ranks[0]["params"][k], ranks[1]["params"][k]), k
    # the test can fail: a rank that kept its own gradient (no all-reduce) is far from the global step
    assert any(not torch.allclose(ranks[0]["params"][k], build_params_after_local_step(arch)[k], atol=1e-6)
               for k in ranks[0]["params"])


def build_params_after_local_step(arch: str) -> dict[str, torch.Tensor]:
    """Weights after the same epoch on rank 0's 250 users alone (what no gradient exchange would give)."""
    cfg = TrainConfig(epochs=1, batch_size=N_USERS, lr=1e-2, device="cpu", progress=False)
    g = torch.Generator().manual_seed(cfg.seed)
    first = torch.tensor_split(torch.randperm(N_USERS, generator=g), 2)[0].sort().values.numpy()
    with mock.patch("torch.randn_like", torch.zeros_like):
        t = Trainer(build(arch), data()[first], cfg, PIA)
        t.fit()
    assert t.anchors is not None
    return {**{"model." + k: p.detach() for k, p in t.model.named_parameters()}, "anchors.weight": t.anchors.weight.detach()}


def test_unequal_shards_are_weighted_by_their_users(ranks: list[dict[str, Any]]) -> None:
    """Batches of 175 over 500 users: 175, 175, 150 users, split 88/87, 88/87, 75/75; 3 Adam steps."""
    one = step_case("multivae", batch_size=175)
    ranks = [r["uneven"] for r in ranks]
    assert one["step"] == ranks[0]["step"] == 3
    for r in ranks:
        assert_tensors_close(r["grads"], one["grads"], rtol=1e-4, atol=1e-6)
        assert_tensors_close(r["params"], one["params"], rtol=1e-4, atol=1e-5)


def test_the_moving_average_is_what_a_ddp_run_keeps(ranks: list[dict[str, Any]]) -> None:
    """Same data, seed and steps: with ema_halflife the kept weights are the average, not the weights as trained."""
    plain, ema = ranks[0]["resume"]["full"], ranks[0]["resume-ema"]["full"]
    assert any(not torch.equal(plain["model"][k], ema["model"][k]) for k in plain["model"])
    assert torch.equal(plain["anchors"], ema["anchors"])  # the average covers the model only; training is the same
    assert [r["loss"] for r in plain["history"]] == [r["loss"] for r in ema["history"]]


@pytest.mark.parametrize("case", ["resume", "resume-ema"])
def test_resume_under_ddp_reproduces_the_uninterrupted_run(case: str, ranks: list[dict[str, Any]]) -> None:
    ranks = [r[case] for r in ranks]
    for r in ranks:
        full, resumed = r["full"], r["resumed"]
        assert full["history"] == resumed["history"] and len(full["history"]) == 4
        assert full["best_epoch"] == resumed["best_epoch"]
        assert torch.equal(full["anchors"], resumed["anchors"])
        for k in full["model"]:
            assert torch.equal(full["model"][k], resumed["model"][k]), k
    # the beta ramp is planned in global batches (every rank the same plan) and survives the resume mid-ramp
    batches = -(-400 // 64)  # 400 training users, global batches of 64
    for r in ranks:
        assert r["full"]["planned"] == r["resumed"]["planned"] == (4 * batches, 4 * batches)
        betas = [h["beta"] for h in r["full"]["history"]]
        assert 0 < betas[1] < betas[2] < betas[3] < 0.2
        want = [sum(0.2 * s / (4 * batches) for s in range(e * batches, (e + 1) * batches)) / batches for e in range(4)]
        assert betas == pytest.approx(want)  # each epoch's mean beta: the single-process schedule
    for k in ranks[0]["full"]["model"]:  # identical weights on both ranks
        assert torch.equal(ranks[0]["full"]["model"][k], ranks[1]["full"]["model"][k]), k
    assert ranks[0]["full"]["history"] == ranks[1]["full"]["history"]  # the same record (and stop) everywhere


def test_not_distributed_is_rank_0_of_1() -> None:
    dp = DataParallel.current()
    assert dp == DataParallel(0, 1) and not dp.active and dp.is_main
    rows = torch.arange(7)
    assert torch.equal(dp.shard(rows), rows)
    assert [len(DataParallel(r, 2).shard(rows)) for r in (0, 1)] == [4, 3]
    assert len(DataParallel(2, 4).shard(torch.arange(2))) == 0  # a short last batch leaves a rank nothing
