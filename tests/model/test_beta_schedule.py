"""model.vae's KL-weight schedules (progress, constant, liang) and how model.train.Trainer drives them.

"progress" needs the run's planned updates: the trainer sets them on the model (epochs x batches per epoch) and
keeps them across a checkpoint, so a resumed run continues the very same ramp.
"""

from __future__ import annotations

import io
from types import SimpleNamespace
from typing import Any

import pydantic
import pytest
import torch

from model.layers import gaussian_kl
from model.sparse import as_batch
from model.split import Split
from model.train import TrainConfig, Trainer
from model.vae import MultiVAE, Phase, VAEConfig, beta_at, dae_config, kl_user_weight

TINY = {"hidden_dims": (), "latent_dim": 2}


@pytest.mark.parametrize(("step", "want"), [(0, 0.0), (50, 0.05), (100, 0.1), (199, 0.199), (200, 0.2),
                                            (201, 0.2), (999, 0.2), (10**6, 0.2)])
def test_progress_reaches_beta_max_at_the_fraction_of_the_plan(step: int, want: float) -> None:
    cfg = VAEConfig(**TINY, beta_schedule="progress", anneal_fraction=0.2, beta_max=0.2)
    assert beta_at(cfg, step, planned_updates=1000) == pytest.approx(want)  # the cap at 0.2 x 1000 updates


def test_progress_scales_with_the_plan_not_the_step_count() -> None:
    cfg = VAEConfig(**TINY, anneal_fraction=0.5, beta_max=0.4)
    # half-way through the ramp is beta_max / 2 whatever the run's length (ml-1m's 2k updates or ML-20M's 47k)
    assert beta_at(cfg, 500, 2_000) == pytest.approx(0.2)
    assert beta_at(cfg, 11_750, 47_000) == pytest.approx(0.2)
    assert beta_at(cfg, 999, 2_000) < 0.4 == beta_at(cfg, 1_000, 2_000)
    full = VAEConfig(**TINY, anneal_fraction=1.0)
    assert beta_at(full, 999, 1_000) < 0.2 == beta_at(full, 1_000, 1_000)  # fraction 1: the cap at the last update


def test_constant_and_liang() -> None:
    const = VAEConfig(**TINY, beta_schedule="constant", beta_max=0.3)
    assert [beta_at(const, s, 100) for s in (0, 1, 50, 10**6)] == [0.3] * 4
    assert beta_at(const, 0) == 0.3  # needs no plan
    liang = VAEConfig(**TINY, beta_schedule="liang", anneal_steps=200_000, beta_max=0.2)
    # Liang et al.: step / 200k, capped; the plan plays no part (ml-1m's 2,000 updates end at beta = 0.01)
    assert beta_at(liang, 2_000, 2_000) == pytest.approx(0.01)
    assert beta_at(liang, 40_000, 2_000) == pytest.approx(0.2) == beta_at(liang, 10**7)
    assert beta_at(VAEConfig(**TINY, beta_schedule="liang", anneal_steps=0), 0) == 0.2
    assert beta_at(dae_config(beta_schedule="constant"), 10, 100) == 0.0  # a DAE has no KL term


def test_progress_without_a_plan_is_beta_max() -> None:
    assert beta_at(VAEConfig(**TINY, beta_max=0.25), 0) == 0.25


def test_the_default_anneals_by_progress() -> None:
    cfg = VAEConfig()
    assert (cfg.beta_schedule, cfg.anneal_fraction, cfg.beta_max) == ("progress", 0.2, 0.2)
    assert VAEConfig.model_validate({}).beta_schedule == "progress"


def test_a_config_written_before_the_schedules_existed_keeps_liang() -> None:
    """An older bundle's model_config JSON names anneal_steps and no schedule: it was trained with Liang's ramp."""
    old = {"hidden_dims": [600], "latent_dim": 200, "dropout": 0.5, "variational": True, "beta_max": 0.2,
           "anneal_steps": 200_000}
    cfg = VAEConfig.model_validate(old)
    assert cfg.beta_schedule == "liang" and beta_at(cfg, 2_000, 2_000) == pytest.approx(0.01)
    assert VAEConfig.model_validate(cfg.model_dump(mode="json")) == cfg  # and a new config round-trips as it is
    new = VAEConfig(anneal_fraction=0.5)
    assert VAEConfig.model_validate(new.model_dump(mode="json")) == new
    assert VAEConfig(anneal_steps=10, beta_schedule="constant").beta_schedule == "constant"  # explicit wins


@pytest.mark.parametrize("bad", [{"anneal_fraction": 0.0}, {"anneal_fraction": -0.1}, {"anneal_fraction": 1.01},
                                 {"beta_schedule": "cosine"}, {"beta_schedule": ""}, {"beta_max": -0.1}])
def test_bad_schedule_settings_are_rejected(bad: dict[str, Any]) -> None:
    with pytest.raises(pydantic.ValidationError):
        VAEConfig(**bad)


def test_beta_method_takes_the_plan_from_the_argument_or_the_model() -> None:
    model = MultiVAE(10, VAEConfig(**TINY, anneal_fraction=0.5))
    assert model.planned_updates is None and model.beta(0) == 0.2  # not planned yet: beta_max
    assert model.beta(25, planned_updates=100) == pytest.approx(0.1)
    model.planned_updates = 1000
    assert model.beta(250) == pytest.approx(0.1)
    # the unbound call pipeline.training.train_job's epoch logger makes on a bare config still works
    assert MultiVAE.beta(SimpleNamespace(config=VAEConfig(**TINY, beta_schedule="constant")), 5) == 0.2  # type: ignore[arg-type]


def cfg(**kw: Any) -> TrainConfig:
    return TrainConfig(batch_size=32, device="cpu", progress=False, **kw)


def trainer(split: Split, epochs: int, seed: int = 0) -> Trainer:
    torch.manual_seed(seed)
    vae = VAEConfig(hidden_dims=(16,), latent_dim=4, anneal_fraction=1.0)  # anneals over the whole run
    return Trainer(MultiVAE(split.train.shape[1], vae), split.train, cfg(epochs=epochs), None, split.valid)


def test_the_trainer_plans_epochs_times_batches_and_the_loss_uses_it(split: Split) -> None:
    t = trainer(split, epochs=3)
    batches = -(-split.train.shape[0] // 32)  # 100 training users: 4 batches of 32, 32, 32, 4
    assert t.planned_updates == 3 * batches == t.model.planned_updates
    t.fit()
    betas = [r["beta"] for r in t.history]  # each epoch's mean beta over its updates
    want = [sum(0.2 * s / (3 * batches) for s in range(e * batches, (e + 1) * batches)) / batches for e in range(3)]
    assert betas == pytest.approx(want)
    assert t.model.beta(t.step) == pytest.approx(0.2)  # the cap at the end of the planned run


def persisted(state: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint callback that writes the state to disk keeps: a serialized copy."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf)


def test_resume_mid_anneal_gives_the_same_beta(split: Split) -> None:
    full = trainer(split, epochs=4)
    saved: dict[int, dict[str, Any]] = {}
    full.fit(checkpoint=lambda s: saved.setdefault(s["epoch"], persisted(s)))
    assert 0 < full.history[1]["beta"] < full.history[2]["beta"] < 0.2  # epoch 2 ends mid-ramp
    resumed = trainer(split, epochs=4, seed=7)
    resumed.load_state_dict(saved[2])
    resumed.fit()
    assert [r["beta"] for r in resumed.history] == [r["beta"] for r in full.history]
    # a run resumed with a longer budget keeps the checkpoint's plan: the same ramp, then the cap
    longer = trainer(split, epochs=6, seed=7)
    assert longer.planned_updates == 6 * 4
    longer.load_state_dict(saved[2])
    assert longer.planned_updates == 4 * 4 == longer.model.planned_updates
    longer.fit()
    assert [r["beta"] for r in longer.history[:4]] == [r["beta"] for r in full.history]
    assert [r["beta"] for r in longer.history[4:]] == pytest.approx([0.2, 0.2])
    # a checkpoint written before plans were saved: the resuming run's own plan
    old = trainer(split, epochs=4, seed=7)
    old.load_state_dict({k: v for k, v in saved[2].items() if k != "planned_updates"})
    assert old.planned_updates == 16


def test_kl_weight_by_count_is_proportional_to_history_and_averages_one() -> None:
    counts = torch.tensor([2.0, 4.0, 6.0, 0.0])
    uniform = kl_user_weight(VAEConfig(**TINY), counts)
    assert torch.equal(uniform, torch.ones(4))
    by_count = VAEConfig(**TINY, kl_weight="count")
    w = kl_user_weight(by_count, counts[:3])
    assert torch.allclose(w, torch.tensor([0.5, 1.0, 1.5]))  # |x_u| / mean |x_u|: beta_max keeps its scale
    # a padded row (weight 0) neither counts in the mean nor changes the real rows' weights
    padded = kl_user_weight(by_count, counts, row_weight=torch.tensor([1.0, 1.0, 1.0, 0.0]))
    assert torch.allclose(padded[:3], w)


def test_kl_weight_by_count_weighs_each_users_kl_by_history() -> None:
    """The loss's KL term is the mean of each user's KL times its weight: 1/3 and 5/3 for histories of 1 and 5."""
    x = torch.zeros(2, 6)
    x[0, :1] = 1.0  # a light user: 1 item
    x[1, :5] = 1.0  # a heavy user: 5 items
    batch = as_batch(x)
    for mode in ("uniform", "count"):
        torch.manual_seed(0)
        model = MultiVAE(6, VAEConfig(**TINY, beta_schedule="constant", kl_weight=mode))
        mu, logvar = model.encode(batch)
        assert logvar is not None
        per_user = gaussian_kl(mu, logvar)
        torch.manual_seed(1)
        out = model.loss(batch, step=0, phase=Phase("all", 1, 0.0, pia=False))
        want = per_user.mean() if mode == "uniform" else (per_user * torch.tensor([1 / 3, 5 / 3])).mean()
        assert float(out.terms["kl"].detach()) == pytest.approx(float(want.detach()), rel=1e-5)


def test_an_unknown_kl_weight_is_refused() -> None:
    with pytest.raises(pydantic.ValidationError, match="uniform"):
        VAEConfig(kl_weight="per_item")
