"""`recsys experiment --arch-grid`: autoencoder settings (width, latent size, dropout, lr, ...) searched on validation
users and crossed with λ_A; `--tune-only` scores no test user; `--keep-fits` lets the run that scores the winner load
it instead of fitting it again; bad settings refused before anything trains."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pydantic
import pytest

import pipeline.research.experiment as exp_mod
from model.recvae import RecVAEConfig
from model.vae import VAEConfig
from pipeline.cli.main import main
from pipeline.research.experiment import ExperimentJob
from pipeline.research.report import hp_label

GRID = ({"hidden_dims": [40], "latent_dim": 8}, {"dropout": 0.2, "lr": 3e-3, "batch_size": 64, "weight_decay": 1e-4,
                                                      "ema_halflife": 2.0})


def small(out: Path, **kw: Any) -> ExperimentJob:
    base = dict(dataset="synthetic", models=("multivae-pia",), seeds=1, out=out, device="cpu", synthetic_users=300,
                synthetic_items=120, epochs=3, patience=2, pia_grid=(0.1, 1.0), arch_grid=GRID, progress=False)
    return ExperimentJob(**(base | kw))


def record_builds(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """What each built model was given: its model config, trainer settings and PIA weight."""
    real, built = exp_mod.make_recommender, []

    def build(name: str, **kw: Any) -> Any:
        train = kw["train"]
        built.append({"name": name, "config": kw.get("model_config"), "lr": train.lr, "batch_size": train.batch_size,
                      "weight_decay": train.weight_decay, "ema": train.ema_halflife,
                      "pia": kw["pia"].weight if kw.get("pia") else None})
        return real(name, **kw)

    monkeypatch.setattr(exp_mod, "make_recommender", build)
    return built


def test_settings_are_crossed_with_lambda_and_chosen_on_validation(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    built = record_builds(monkeypatch)
    res = small(tmp_path, seeds=2).run().results
    rows = res["tuning"]["multivae-pia"]
    assert [r["value"] for r in rows] == [dict(a) | {"lambda_a": w} for a in GRID for w in (0.1, 1.0)]
    best = max(rows, key=lambda r: r["val_ndcg@100"])
    assert res["chosen"]["multivae-pia"] == best["value"]
    assert len({r["val_ndcg@100"] for r in rows}) == 4  # the settings reach the model: four different fits
    # the grid's settings reach the model config and the trainer; seed 1 is fit once, at the chosen value
    assert built[0]["config"] == VAEConfig(hidden_dims=(40,), latent_dim=8)
    assert (built[0]["lr"], built[0]["batch_size"], built[0]["weight_decay"]) == (1e-3, 500, 0.0)  # the defaults
    assert built[2]["config"] == VAEConfig(dropout=0.2)  # the trainer's keys are not the model's
    assert (built[2]["lr"], built[2]["batch_size"], built[2]["weight_decay"]) == (3e-3, 64, 1e-4)
    assert (built[0]["ema"], built[2]["ema"]) == (None, 2.0)
    assert [b["pia"] for b in built[:4]] == [0.1, 1.0, 0.1, 1.0] and len(built) == 5
    assert built[4]["pia"] == best["value"]["lambda_a"]
    assert [r["seed"] for r in res["per_seed"]["multivae-pia"]] == [0, 1]
    assert f"| multivae-pia | {hp_label(best['value'])} **(chosen)** |" in (tmp_path / "results.md").read_text()


def test_recvae_takes_its_own_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built = record_builds(monkeypatch)
    res = small(tmp_path, models=("recvae",), arch_grid=({"hidden_dim": 50, "latent_dim": 10, "gamma": 0.01},),
                epochs=2).run().results
    assert built[0]["config"] == RecVAEConfig(hidden_dim=50, latent_dim=10, gamma=0.01)
    assert res["chosen"]["recvae"] == {"hidden_dim": 50, "latent_dim": 10, "gamma": 0.01}


def test_tune_only_scores_no_test_user_and_a_resume_scores_the_kept_winner(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    whole = small(tmp_path / "whole").run().results
    scored: list[int] = []
    real_evaluate = exp_mod.evaluate

    def evaluate(score: Any, fold_in: Any, targets: Any, **kw: Any) -> Any:
        scored.append(fold_in.shape[0])
        return real_evaluate(score, fold_in, targets, **kw)

    monkeypatch.setattr(exp_mod, "evaluate", evaluate)
    tuned = small(tmp_path / "run", tune_only=True, keep_fits=True, models=("popularity", "multivae-pia"),
                  seeds=3).run().results
    assert len(scored) == 4  # the four validation scorings only: no test user, no popularity fit, one seed
    assert tuned["per_seed"]["multivae-pia"] == [] and tuned["models"] == {} and tuned["tune_only"]
    assert tuned["tuning"] == whole["tuning"] and tuned["chosen"] == whole["chosen"]
    assert "no test user was scored" in (tmp_path / "run" / "results.md").read_text()
    assert len(list((tmp_path / "run" / "fits").glob("multivae-pia-seed0-*.pkl"))) == 1  # the winner only

    built = record_builds(monkeypatch)
    res = small(tmp_path / "run", resume=True, keep_fits=True).run().results
    assert built == []  # the search is restored and its winner loaded: nothing trains
    assert res["per_seed"]["multivae-pia"][0]["ndcg@100"] == whole["per_seed"]["multivae-pia"][0]["ndcg@100"]
    assert res["chosen"] == whole["chosen"]


def test_a_resume_without_a_kept_fit_fits_the_winner_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small(tmp_path, tune_only=True).run()
    assert not (tmp_path / "fits").exists()
    built = record_builds(monkeypatch)
    res = small(tmp_path, resume=True).run().results
    assert len(built) == 1 and built[0]["pia"] == res["chosen"]["multivae-pia"]["lambda_a"]


def test_pia_settings_reach_the_anchors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real, given = exp_mod.make_recommender, []

    def build(name: str, **kw: Any) -> Any:
        given.append(kw["pia"])
        return real(name, **kw)

    monkeypatch.setattr(exp_mod, "make_recommender", build)
    grid = ({"pia_init": "encoder"}, {"pia_schedule": "linear", "pia_warmup_steps": 20, "pia_estimator": "sampled"})
    res = small(tmp_path, arch_grid=grid, pia_grid=(0.5,), tune_only=True).run().results
    assert [(p.weight, p.init, p.schedule, p.warmup_steps, p.estimator) for p in given] == [
        (0.5, "encoder", "constant", 0, "closed_form"), (0.5, "normal", "linear", 20, "sampled")]
    rows = res["tuning"]["multivae-pia"]
    assert rows[0]["val_ndcg@100"] != rows[1]["val_ndcg@100"]  # two different fits
    assert [r["value"] for r in rows] == [dict(a) | {"lambda_a": 0.5} for a in grid]


@pytest.mark.parametrize(("grid", "models", "message"), [
    (({"pia_init": "encoder"},), ("multivae-pia", "multivae"), "pia_init set PIA's anchors, which multivae does not"),
    (({"pia_init": "random"},), ("multivae-pia",), "pia_init='random' for multivae-pia"),
    (({"pia_warmup_steps": -5},), ("recvae-pia",), "pia_warmup_steps=-5"),
    (({"pia_weight": 2.0},), ("multivae-pia",), "'pia_weight' is not a setting of multivae-pia"),
    (({"width": 100},), ("multivae",), "'width' is not a setting of multivae"),
    (({"hidden_dim": 100},), ("multivae", "recvae"), "'hidden_dim' is not a setting of multivae"),
    (({"dropout": 1.5},), ("multivae",), "dropout=1.5"),
    (({"latent_dim": 0},), ("recvae-pia",), "latent_dim=0"),
    (({"lr": -1},), ("multivae",), "lr=-1"),
    (({"batch_size": 0},), ("multivae-pia",), "batch_size=0 for multivae-pia: Input should be greater than or equal to 1"),
    (({"weight_decay": -0.1},), ("recvae",), "weight_decay=-0.1"),
    (({"batch_size": "big"},), ("multivae",), "batch_size='big'"),
    (({"ema_halflife": 0},), ("multivae-pia",), "ema_halflife=0"),
    (({},), ("multivae",), "is empty"),
    (({"dropout": 0.3},), ("ease",), "none is in models"),
])
def test_bad_settings_are_refused_before_anything_trains(tmp_path: Path, grid: tuple, models: tuple,
                                                         message: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=message):
        small(tmp_path / "out", arch_grid=grid, models=models)
    assert not (tmp_path / "out").exists()


def test_tune_only_with_nothing_to_search_is_refused(tmp_path: Path) -> None:
    with pytest.raises(pydantic.ValidationError, match="no model in models has values to search"):
        small(tmp_path, models=("popularity", "multivae"), arch_grid=(), tune_only=True)


def test_the_cli_reads_sets_and_json_values(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["experiment", "--dataset", "synthetic", "--models", "multivae", "--seeds", "1", "--no-progress",
            "--synthetic-users", "300", "--synthetic-items", "120", "--device", "cpu", "--epochs", "2", "--tune-only"]
    assert main([*args, "--out", str(tmp_path / "ok"), "--arch-grid",
                 "hidden_dims=[40,20],latent_dim=8;dropout=0.2,variational=false"]) == 0
    res = json.loads((tmp_path / "ok" / "results.json").read_text())
    assert [r["value"] for r in res["tuning"]["multivae"]] == [{"hidden_dims": [40, 20], "latent_dim": 8},
                                                               {"dropout": 0.2, "variational": False}]
    with pytest.raises(SystemExit):
        main([*args, "--out", str(tmp_path / "bad"), "--arch-grid", "dropout"])
    assert "not key=value" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main([*args, "--out", str(tmp_path / "bad"), "--arch-grid", "width=3"]) != 0
    assert "'width' is not a setting of multivae" in capsys.readouterr().err and not (tmp_path / "bad").exists()
