"""model.train: determinism, checkpoint/resume, best-epoch selection, early stopping, devices, progress."""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from model.pia import PIAConfig
from model.recommenders import Autoencoder, make_recommender
from model.recvae import RecVAEConfig
from model.split import Split
from model.train import TrainConfig, Trainer, resolve_device
from model.vae import MultiVAE, VAEConfig


def deep_copy(state: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint callback that persists the state does: serialize it now."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf)


def strip_times(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "train_seconds"} for r in history]


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def differs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


def recommender(arch: str, train: TrainConfig) -> Autoencoder:
    if arch == "multivae-pia":
        rec = make_recommender(
            arch,
            train=train,
            pia=PIAConfig(weight=0.5, init="encoder"),
            model_config=VAEConfig(hidden_dims=(32,), latent_dim=8),
        )
    else:
        rec = make_recommender(arch, train=train, model_config=RecVAEConfig(hidden_dim=32, latent_dim=8))
    assert isinstance(rec, Autoencoder)
    return rec


@pytest.mark.parametrize("arch", ["multivae-pia", "recvae"])
def test_same_seed_same_run_other_seed_other_run(arch: str, split: Split, train_config) -> None:
    runs = [recommender(arch, train_config(seed=s)).fit(split.train, split.valid) for s in (0, 0, 1)]
    a, b, c = (r.module.state_dict() for r in runs)  # type: ignore[union-attr]
    assert_same_state(a, b)
    assert strip_times(runs[0].history) == strip_times(runs[1].history)
    assert differs(a, c)
    assert strip_times(runs[0].history) != strip_times(runs[2].history)


@pytest.mark.parametrize("arch", ["multivae-pia", "recvae"])
def test_resume_from_a_checkpoint_reproduces_the_run(arch: str, split: Split, train_config) -> None:
    cfg = train_config(epochs=4)
    saved: dict[int, dict[str, Any]] = {}

    def checkpoint(state: dict[str, Any]) -> None:
        saved[state["epoch"]] = deep_copy(state)

    full = recommender(arch, cfg).fit(split.train, split.valid, checkpoint=checkpoint)
    assert sorted(saved) == [1, 2, 3, 4]
    assert len(saved[2]["history"]) == 2
    if arch == "multivae-pia":
        assert saved[2]["anchors"] is not None

    resumed = recommender(arch, cfg).fit(split.train, split.valid, resume=saved[2])
    assert_same_state(full.module.state_dict(), resumed.module.state_dict())  # type: ignore[union-attr]
    assert strip_times(full.history) == strip_times(resumed.history)
    assert full.best_epoch == resumed.best_epoch
    # and the resumed run did train: its weights are not those saved at epoch 2
    assert differs(saved[2]["model"], resumed.module.state_dict())  # type: ignore[union-attr]


def test_a_resumed_fit_reports_the_time_of_every_run(split: Split, train_config) -> None:
    """A fit finished over several processes counts the seconds the stopped ones spent (to their last state)."""
    cfg = train_config(epochs=3)
    saved: dict[int, dict[str, Any]] = {}
    one_go = recommender("recvae", cfg).fit(split.train, split.valid,
                                              checkpoint=lambda s: saved.setdefault(s["epoch"], deep_copy(s)))
    assert 0.0 < saved[1]["seconds"] < saved[2]["seconds"] < saved[3]["seconds"] <= one_go.fit_seconds
    assert one_go.resumed_seconds == 0.0
    # as if the stopped process had run for 1000 s before its state at epoch 2
    resumed = recommender("recvae", cfg).fit(split.train, split.valid, resume=saved[2] | {"seconds": 1000.0})
    assert resumed.resumed_seconds == 1000.0
    assert 1000.0 < resumed.fit_seconds < 1000.0 + one_go.fit_seconds * 5
    # a state written before states carried their seconds resumes too, counting only this run
    old = recommender("recvae", cfg).fit(split.train, split.valid,
                                           resume={k: v for k, v in saved[2].items() if k != "seconds"})
    assert old.resumed_seconds == 0.0 and 0.0 < old.fit_seconds < 1000.0


def test_checkpoint_resume_with_a_fresh_trainer(split: Split, tiny_vae, train_config) -> None:
    """The Trainer API directly: a fresh Trainer (other init weights) loads the state and continues."""
    cfg = train_config(epochs=4)
    pia = PIAConfig(weight=0.5)
    torch.manual_seed(0)
    t1 = Trainer(MultiVAE(split.train.shape[1], tiny_vae), split.train, cfg, pia, split.valid)
    saved: dict[int, dict[str, Any]] = {}
    t1.fit(checkpoint=lambda s: saved.setdefault(s["epoch"], deep_copy(s)))
    torch.manual_seed(123)  # different initial weights and RNG state: everything must come from the checkpoint
    t2 = Trainer(MultiVAE(split.train.shape[1], tiny_vae), split.train, cfg, pia, split.valid)
    t2.load_state_dict(saved[2])
    assert t2.epoch == 2
    t2.fit()
    assert_same_state(t1.model.state_dict(), t2.model.state_dict())
    assert torch.equal(t1.anchors.weight, t2.anchors.weight)  # type: ignore[union-attr]
    assert strip_times(t1.history) == strip_times(t2.history)
    assert (t1.step, t1.best_epoch, t1.best_value) == (t2.step, t2.best_epoch, t2.best_value)


def test_returned_model_has_the_best_validation_epoch(split: Split, tiny_vae, train_config) -> None:
    torch.manual_seed(0)
    cfg = train_config(epochs=8, lr=3e-2)
    trainer = Trainer(MultiVAE(split.train.shape[1], tiny_vae), split.train, cfg, valid=split.valid)
    states: dict[int, dict[str, torch.Tensor]] = {}
    history = trainer.fit(checkpoint=lambda s: states.setdefault(s["epoch"], deep_copy(s["model"])))
    values = [r["val_ndcg@100"] for r in history]
    best = max(range(len(values)), key=lambda i: (values[i], -i)) + 1  # first epoch with the max
    assert trainer.best_epoch == best and trainer.best_value == values[best - 1]
    assert_same_state(trainer.model.state_dict(), states[best])
    if best < len(history):  # with this seed the best epoch is not the last one: the weights were rolled back
        assert differs(trainer.model.state_dict(), states[len(history)])
    assert not trainer.model.training  # fit leaves the model in eval mode
    assert trainer.validate()["val_ndcg@100"] == pytest.approx(values[best - 1], abs=1e-6)


def scripted(trainer: Trainer, values: list[float]) -> list[int]:
    """Replace the validation by a scripted sequence of ndcg@100 values; returns the epochs it ran at."""
    calls: list[int] = []

    def validate() -> dict[str, float]:
        calls.append(trainer.epoch)
        return {"val_ndcg@100": values[len(calls) - 1]}

    trainer.validate = validate  # type: ignore[method-assign]
    return calls


def test_patience_stops_early_and_rolls_back(split: Split, tiny_vae, train_config) -> None:
    torch.manual_seed(0)
    trainer = Trainer(
        MultiVAE(split.train.shape[1], tiny_vae),
        split.train,
        train_config(epochs=10, patience=2),
        valid=split.valid,
    )
    scripted(trainer, [0.1, 0.3, 0.2, 0.25, 0.9, 0.95, 0.99, 0.99, 0.99, 0.99])
    states: dict[int, dict[str, torch.Tensor]] = {}
    history = trainer.fit(checkpoint=lambda s: states.setdefault(s["epoch"], deep_copy(s["model"])))
    assert len(history) == 4 and trainer.epoch == 4  # epochs 3 and 4 did not beat epoch 2
    assert trainer.best_epoch == 2 and trainer.best_value == 0.3
    assert_same_state(trainer.model.state_dict(), states[2])


def test_lr_decays_after_each_plateau_and_a_resume_continues_from_the_decayed_rate(split: Split, tiny_vae,
                                                                                   train_config) -> None:
    cfg = train_config(epochs=8, lr=1e-2, lr_decay=0.5, lr_decay_patience=2)
    values = [0.1, 0.2, 0.15, 0.18, 0.3, 0.29, 0.28, 0.27]  # plateaus: epochs 3-4, then 6-8
    torch.manual_seed(0)
    trainer = Trainer(MultiVAE(split.train.shape[1], tiny_vae), split.train, cfg, valid=split.valid)
    scripted(trainer, values)
    saved: dict[int, dict[str, Any]] = {}
    history = trainer.fit(checkpoint=lambda s: saved.setdefault(s["epoch"], deep_copy(s)))
    # halved after the 2nd evaluation without a better one (epoch 4), then after epoch 7's; a new best resets the count
    assert [r["lr"] for r in history] == [1e-2, 1e-2, 1e-2, 5e-3, 5e-3, 5e-3, 2.5e-3, 2.5e-3]
    assert trainer.optimizers["all"].param_groups[0]["lr"] == 2.5e-3

    torch.manual_seed(1)
    again = Trainer(MultiVAE(split.train.shape[1], tiny_vae), split.train, cfg, valid=split.valid)
    scripted(again, values[5:])
    again.load_state_dict(saved[5])
    assert again.lr == 5e-3  # the rate is in the optimizer's state
    rest = again.fit()
    assert [r["lr"] for r in rest[5:]] == [5e-3, 2.5e-3, 2.5e-3]
    assert_same_state(trainer.model.state_dict(), again.model.state_dict())


def test_lr_decay_off_by_default(split: Split, tiny_vae, train_config) -> None:
    torch.manual_seed(0)
    trainer = Trainer(MultiVAE(split.train.shape[1], tiny_vae), split.train, train_config(epochs=4), valid=split.valid)
    scripted(trainer, [0.3, 0.2, 0.1, 0.0])
    assert [r["lr"] for r in trainer.fit()] == [1e-3] * 4


def test_no_patience_runs_all_epochs_and_ties_keep_the_first(split: Split, tiny_vae, train_config) -> None:
    torch.manual_seed(0)
    trainer = Trainer(MultiVAE(split.train.shape[1], tiny_vae), split.train, train_config(epochs=5), valid=split.valid)
    scripted(trainer, [0.1, 0.3, 0.3, 0.2, 0.1])
    states: dict[int, dict[str, torch.Tensor]] = {}
    history = trainer.fit(checkpoint=lambda s: states.setdefault(s["epoch"], deep_copy(s["model"])))
    assert len(history) == 5 and trainer.best_epoch == 2
    assert_same_state(trainer.model.state_dict(), states[2])


def test_eval_every(split: Split, tiny_vae, train_config) -> None:
    torch.manual_seed(0)
    trainer = Trainer(
        MultiVAE(split.train.shape[1], tiny_vae),
        split.train,
        train_config(epochs=5, eval_every=2),
        valid=split.valid,
    )
    calls = scripted(trainer, [0.1, 0.2, 0.3])
    history = trainer.fit()
    assert calls == [2, 4, 5]  # every 2nd epoch and the last one
    assert [("val_ndcg@100" in r) for r in history] == [False, True, False, True, True]
    assert trainer.best_epoch == 5


def test_without_validation_the_last_epoch_is_kept(matrix: sp.csr_matrix, tiny_vae, train_config) -> None:
    torch.manual_seed(0)
    trainer = Trainer(MultiVAE(matrix.shape[1], tiny_vae), matrix, train_config(epochs=3))
    states: dict[int, dict[str, torch.Tensor]] = {}
    history = trainer.fit(checkpoint=lambda s: states.setdefault(s["epoch"], deep_copy(s["model"])))
    assert len(history) == 3 and trainer.best_epoch == 3
    assert_same_state(trainer.model.state_dict(), states[3])
    assert not any(k.startswith("val_") for r in history for k in r)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present")
def test_cuda_without_cuda_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        resolve_device("cuda:1")
    assert resolve_device("auto") == torch.device("cpu")


def test_resolve_device_names() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")


def test_progress_output(split: Split, tiny_vae, train_config, capsys: pytest.CaptureFixture[str],
                         caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    Trainer(
        MultiVAE(split.train.shape[1], tiny_vae),
        split.train,
        train_config(epochs=2, progress=True),
        PIAConfig(weight=0.5),
        split.valid,
    ).fit()
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 2 and lines[0].startswith("epoch 1/2") and lines[1].startswith("epoch 2/2")
    for line in lines:
        assert "loss=" in line and "anchor=" in line and "val_ndcg@100=" in line
    # no bars when progress is off: the epoch line goes to the log instead (seen with `recsys -v`)
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="model.train"):
        Trainer(MultiVAE(split.train.shape[1], tiny_vae), split.train, train_config(epochs=1), valid=split.valid).fit()
    captured = capsys.readouterr()
    assert "epoch" not in captured.out and "epoch" not in captured.err
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch 1/1 ")]
    assert len(logged) == 1 and "val_ndcg@100=" in logged[0]


def test_bf16_autocasts_the_cpu_step_and_keeps_fp32_weights(split: Split, train_config) -> None:
    """On a CPU, bf16 autocasts the training step (docs/benchmarks.md: 1.4x faster with avx512_bf16): the steps'
    products round to bf16, so the weights differ from fp32 training, but they stay float32 and train."""
    runs = []
    for bf16 in (False, True):
        rec = make_recommender("multivae", train=train_config(bf16=bf16), model_config=VAEConfig(hidden_dims=(32,), latent_dim=8))
        runs.append(rec.fit(split.train, split.valid))
    a, b = (r.module.state_dict() for r in runs)  # type: ignore[attr-defined]
    assert all(v.dtype == torch.float32 for v in b.values())
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the bf16 step ran
    ndcg = [r.history[-1]["val_ndcg@100"] for r in runs]  # type: ignore[attr-defined]
    assert all(0 < v <= 1 for v in ndcg) and abs(ndcg[0] - ndcg[1]) < 0.1


def test_on_epoch_callback_sees_every_record(split: Split, train_config) -> None:
    seen: list[dict[str, Any]] = []
    rec = make_recommender("multivae", train=train_config(epochs=3), model_config=VAEConfig(hidden_dims=(32,), latent_dim=8))
    rec.fit(split.train, split.valid, on_epoch=seen.append)
    assert [r["epoch"] for r in seen] == [1, 2, 3]
    assert seen == rec.history  # type: ignore[attr-defined]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("impl", ["coo", "bag", "dense"])
def test_cuda_bf16_training_runs_every_sparse_impl(impl: str, split: Split, train_config,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_SPARSE_MM", impl)
    rec = recommender("multivae-pia", train_config(epochs=2, device="cuda", bf16=True)).fit(split.train, split.valid)
    assert rec.best_epoch >= 1  # type: ignore[attr-defined]
    items, scores = rec.recommend(split.test.fold_in, 10)
    assert items.shape == (split.test.fold_in.shape[0], 10) and np.isfinite(scores).all()


# -- the weights' moving average (ema_halflife) ---------------------------------------------------------------------
def params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def test_ema_decay_follows_the_half_life_in_epochs(split: Split, tiny_vae, train_config) -> None:
    cfg = train_config(epochs=1, batch_size=16, ema_halflife=2.0)
    trainer = Trainer(MultiVAE(split.train.shape[1], tiny_vae), split.train, cfg)
    steps_per_epoch = -(-split.train.shape[0] // 16)
    assert trainer.ema_decay ** (2.0 * steps_per_epoch) == pytest.approx(0.5)
    # one update: ema <- decay_t * ema + (1 - decay_t) * weights, decay_t warmed up as (1 + t) / (10 + t)
    before, live = params(trainer.model), params(trainer.model)
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(1.0)
    trainer._update_ema()
    decay = min(trainer.ema_decay, 2 / 11)
    for e, b, w in zip(trainer.ema, before, live, strict=True):  # type: ignore[arg-type]
        torch.testing.assert_close(e, decay * b + (1 - decay) * (w + 1.0))


def test_ema_off_by_default(split: Split, tiny_vae, train_config) -> None:
    trainer = Trainer(MultiVAE(split.train.shape[1], tiny_vae), split.train, train_config(epochs=1))
    assert trainer.ema is None and trainer.state_dict()["ema"] is None


def test_without_validation_the_model_is_the_last_average(matrix: sp.csr_matrix, tiny_vae, train_config) -> None:
    torch.manual_seed(0)
    trainer = Trainer(MultiVAE(matrix.shape[1], tiny_vae), matrix, train_config(epochs=3, ema_halflife=1.0))
    saved: dict[int, dict[str, Any]] = {}
    trainer.fit(checkpoint=lambda s: saved.setdefault(s["epoch"], deep_copy(s)))
    for p, e in zip(trainer.model.parameters(), saved[3]["ema"], strict=True):
        assert torch.equal(p.detach(), e)
    # the average is not the weights as trained (those are what the checkpoint's "model" holds)
    assert differs(trainer.model.state_dict(), saved[3]["model"])


def test_validation_scores_the_average_and_the_best_average_is_kept(split: Split, tiny_vae, train_config) -> None:
    torch.manual_seed(0)
    cfg = train_config(epochs=6, lr=3e-2, ema_halflife=0.5)
    trainer = Trainer(MultiVAE(split.train.shape[1], tiny_vae), split.train, cfg, valid=split.valid)
    saved: dict[int, dict[str, Any]] = {}
    history = trainer.fit(checkpoint=lambda s: saved.setdefault(s["epoch"], deep_copy(s)))
    best = trainer.best_epoch
    for p, e in zip(trainer.model.parameters(), saved[best]["ema"], strict=True):
        assert torch.equal(p.detach(), e)
    assert trainer.validate()["val_ndcg@100"] == pytest.approx(history[best - 1]["val_ndcg@100"], abs=1e-6)
    # each epoch's figure is the average's: the live weights saved that epoch score differently
    live = MultiVAE(split.train.shape[1], tiny_vae)
    live.load_state_dict(saved[best]["model"])
    trainer.model.load_state_dict(live.state_dict())
    assert trainer.validate()["val_ndcg@100"] != pytest.approx(history[best - 1]["val_ndcg@100"], abs=1e-6)


@pytest.mark.parametrize("arch", ["multivae-pia", "recvae"])
def test_resume_with_ema_reproduces_the_run(arch: str, split: Split, train_config) -> None:
    cfg = train_config(epochs=4, ema_halflife=1.0)
    saved: dict[int, dict[str, Any]] = {}
    full = recommender(arch, cfg).fit(split.train, split.valid, checkpoint=lambda s: saved.setdefault(
        s["epoch"], deep_copy(s)))
    resumed = recommender(arch, cfg).fit(split.train, split.valid, resume=saved[2])
    assert_same_state(full.module.state_dict(), resumed.module.state_dict())  # type: ignore[union-attr]
    assert strip_times(full.history) == strip_times(resumed.history)


def test_resuming_a_checkpoint_without_the_average_is_a_clear_error(split: Split, tiny_vae, train_config) -> None:
    torch.manual_seed(0)
    plain = Trainer(MultiVAE(split.train.shape[1], tiny_vae), split.train, train_config(epochs=1), valid=split.valid)
    plain.fit()
    ema = Trainer(MultiVAE(split.train.shape[1], tiny_vae), split.train, train_config(epochs=2, ema_halflife=1.0),
                  valid=split.valid)
    with pytest.raises(ValueError, match="written without ema_halflife"):
        ema.load_state_dict(plain.state_dict())
