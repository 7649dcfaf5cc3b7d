"""The training job's hyperparameter search (pipeline/training/search.py) on the small synthetic snapshot, against a
private SQLite MLflow store per test (the `home` fixture): nested trial runs, the winner logged and refit, seeded
reproducibility, median pruning, test users never scored, and bad input refused before anything runs."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest

from model.vae import dae_config
from pipeline.errors import DataError
from pipeline.training.search import SearchConfig, load_search_config, run_searches

from .conftest import NAME, tiny

REPO = Path(__file__).resolve().parents[3]

SPACE: dict[str, Any] = {
    "vae.dropout": {"type": "float", "low": 0.1, "high": 0.6},
    "vae.beta_max": {"type": "float", "low": 0.05, "high": 0.5, "log": True},
    "pia.weight": {"type": "float", "low": 0.3, "high": 3.0, "log": True},
    "lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
    "vae.latent_dim": {"type": "categorical", "choices": [4, 8]},
}


def search(**kw: Any) -> SearchConfig:
    """3 trials, no pruning, a budget that never binds (kw override)."""
    base: dict[str, Any] = {"trials": 3, "budget_seconds": 600, "min_trial_seconds": 1, "space": SPACE,
                            "pruner": {"median": False}}
    return SearchConfig(**(base | kw))


def children(run_id: str) -> list[Any]:
    from pipeline.io import registry

    c = registry.client()
    exp = c.get_run(run_id).info.experiment_id
    return c.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{run_id}'", max_results=100)


class NoTestUsers:
    """A snapshot whose test users cannot be read: the search must never need them."""

    def __init__(self, snap: Any) -> None:
        self._snap = snap

    def __getattr__(self, name: str) -> Any:
        if name == "test":
            raise AssertionError("the search read the snapshot's test users")
        return getattr(self._snap, name)


def set_up(job: Any) -> Any:
    """TrainJob's own _Setup for `job`, with the test users out of reach."""
    from pipeline.training.train_job import _set_up

    s = _set_up(job)
    return dataclasses.replace(s, snap=NoTestUsers(s.snap))


def test_search_logs_nested_trials_and_refits_the_winner(home: Path, synth_snapshot: str) -> None:
    from pipeline.io import registry

    job = tiny(synth_snapshot, epochs=3, compare_base=True, baselines=False, diagnose=False, search=search())
    r = job.run()
    c = registry.client()
    parent = c.get_run(r.run_id).data
    kids = children(r.run_id)
    by_model = {m: [k for k in kids if k.data.tags["search.model"] == m] for m in ("multivae-pia", "multivae")}
    assert len(by_model["multivae-pia"]) == 3 and len(by_model["multivae"]) == 3 and len(kids) == 6
    for model, runs in by_model.items():
        for k in runs:
            d = k.data
            expected = set(SPACE) - ({"pia.weight"} if model == "multivae" else set())  # the twin has no PIA
            assert set(d.params) == expected | {"model"}
            assert d.tags["search.state"] == "complete" and k.info.status == "FINISHED"
            curve = c.get_metric_history(k.info.run_id, "val_ndcg_at_100")
            assert [m.step for m in curve] == [1, 2, 3]  # every epoch's validation NDCG@100
            assert d.metrics["best_val_ndcg_at_100"] == pytest.approx(max(m.value for m in curve))
            assert not any(m.startswith("test") for m in d.metrics)  # test users are never scored in a trial
        best = max(runs, key=lambda k: k.data.metrics["best_val_ndcg_at_100"])
        prefix = "" if model == "multivae-pia" else "compare.multivae."
        assert {k: parent.params[f"{prefix}search.best.{k}"] for k in expected} == {k: best.data.params[k] for k in expected}
        assert parent.metrics[f"{prefix}search.n_trials"] == 3
        assert parent.tags[f"{prefix}search.best_run_id"] == best.info.run_id
        # trial 0 is the job's own configuration where it lies in the space (lr 3e-3, latent_dim 8)
        trial0 = next(k for k in runs if k.data.tags["search.trial"] == "0").data.params
        assert float(trial0["lr"]) == 3e-3 and trial0["vae.latent_dim"] == "8"
    # the winner is refit with its parameters: on CPU the refit is the winning trial's run again
    best = max(by_model["multivae-pia"], key=lambda k: k.data.metrics["best_val_ndcg_at_100"])
    refit = c.get_metric_history(r.run_id, "val_ndcg_at_100")
    assert max(m.value for m in refit) == pytest.approx(best.data.metrics["best_val_ndcg_at_100"], abs=1e-6)
    assert r.metrics["best_epoch"] == parent.metrics["search.best_epoch"] == best.data.metrics["best_epoch"]
    assert r.version == "1"


def test_same_seed_same_trials_and_no_test_users(home: Path, synth_snapshot: str) -> None:
    import mlflow

    job = tiny(synth_snapshot, epochs=1, search=search(trials=2, start_from_job=False))
    s = set_up(job)

    def trials(seed: int) -> list[tuple[dict[str, Any], float]]:
        s2 = dataclasses.replace(s, job=job.model_copy(update={"search": job.search.model_copy(update={"seed": seed})}))
        with mlflow.start_run(experiment_id=s.experiment_id):
            (out,) = run_searches(s2, [job.model])
        return [(t.params, t.value) for t in out.trials]

    first, again, other = trials(7), trials(7), trials(8)
    assert len(first) == 2 and first == again  # same parameters and, on CPU, the same validation NDCG@100
    assert [p for p, _ in first] != [p for p, _ in other]
    assert all(math.isfinite(v) for _, v in first)


def test_a_clearly_worse_trial_is_pruned(home: Path, synth_snapshot: str) -> None:
    """Trial 0 is the job's lr 3e-3; the others draw lr log-uniformly from [1e-9, 3e-3] (seed 3: 3.7e-6 and 3.9e-5,
    where the model barely moves from its initial weights): the median pruner stops them after the warm-up."""
    import mlflow

    from pipeline.io import registry

    cfg = search(trials=3, space={"lr": {"type": "float", "low": 1e-9, "high": 3e-3, "log": True}},
                 pruner={"median": True, "warmup_epochs": 2, "startup_trials": 1}, seed=3)
    job = tiny(synth_snapshot, epochs=8, search=cfg)
    s = set_up(job)
    with mlflow.start_run(experiment_id=s.experiment_id) as parent:
        (out,) = run_searches(s, [job.model])
    states = [t.state for t in out.trials]
    assert states[0] == "complete" and "pruned" in states
    pruned = [t for t in out.trials if t.state == "pruned"]
    assert all(2 <= t.epochs < 8 for t in pruned)  # stopped mid-fit, after the warm-up
    c = registry.client()
    assert all(c.get_run(t.run_id).data.tags["search.state"] == "pruned" for t in pruned)
    assert all(c.get_run(t.run_id).info.status == "FINISHED" for t in out.trials)  # a pruned trial is no failure
    assert out.overrides == out.trials[0].params and out.best_value == out.trials[0].value
    assert c.get_run(parent.info.run_id).data.metrics["search.n_pruned"] == len(pruned)


def test_a_spent_budget_stops_the_running_trial_after_its_epoch(home: Path, synth_snapshot: str) -> None:
    """Half a second for up to 3 trials of 200 epochs: trial 0 stops at the first epoch past the budget, keeps its
    best epoch so far (it is the winner), and no further trial starts."""
    import mlflow

    from pipeline.io import registry

    job = tiny(synth_snapshot, epochs=200, search=search(budget_seconds=0.5, min_trial_seconds=0.1))
    s = set_up(job)
    with mlflow.start_run(experiment_id=s.experiment_id):
        (out,) = run_searches(s, [job.model])
    (t,) = out.trials
    assert t.state == "complete" and 1 <= t.epochs < 200 and 1 <= t.best_epoch <= t.epochs
    assert registry.client().get_run(t.run_id).data.tags["search.stopped"] == "budget"
    assert out.overrides == t.params and out.best_epoch == t.best_epoch


BAD: dict[str, tuple[dict[str, Any], dict[str, Any], str]] = {
    # name: (job keys, search keys, message)
    "budget": ({}, {"budget_seconds": 50, "min_trial_seconds": 60}, "not one trial fits"),
    "budget split with the twin": ({"compare_base": True}, {"budget_seconds": 100, "min_trial_seconds": 60},
                                   "multivae-pia and multivae"),
    "unknown key": ({}, {"space": {"vae.nope": {"type": "float", "low": 0.1, "high": 0.2}}}, "not a TrainJob key"),
    "not a hyperparameter": ({}, {"space": {"epochs": {"type": "int", "low": 1, "high": 5}}}, "early stopping"),
    "low >= high": ({}, {"space": {"vae.dropout": {"type": "float", "low": 0.5, "high": 0.5}}}, "is empty"),
    "log low <= 0": ({}, {"space": {"lr": {"type": "float", "low": 0.0, "high": 0.1, "log": True}}}, "log range"),
    "empty choices": ({}, {"space": {"vae.latent_dim": {"type": "categorical", "choices": []}}}, "no choices"),
    "outside the field": ({}, {"space": {"vae.dropout": {"type": "float", "low": 0.5, "high": 1.0}}}, "refuses"),
    "float for an int": ({}, {"space": {"vae.latent_dim": {"type": "float", "low": 4, "high": 8}}}, "integer"),
    "pia.weight without PIA": ({"model": "multivae"}, {"space": {"pia.weight": {"type": "float", "low": 0.1,
                                                                                "high": 1.0}}}, "does not apply"),
    "vae.* for RecVAE": ({"model": "recvae-pia"}, {"space": {"vae.dropout": {"type": "float", "low": 0.1,
                                                                              "high": 0.5}}}, "does not apply"),
    "recvae.* for Multi-VAE": ({}, {"space": {"recvae.hidden_dim": {"type": "categorical", "choices": [8, 16]}}},
                               "does not apply"),
    "recvae.gamma below 0": ({"model": "recvae-pia"}, {"space": {"recvae.gamma": {"type": "float", "low": -0.1,
                                                                                  "high": 0.1}}}, "refuses"),
    "KL weighting of a DAE": ({"model": "multidae", "vae": dae_config(latent_dim=8)}, {"space": {"vae.kl_weight": {
        "type": "categorical", "choices": ["uniform", "count"]}}}, "does not apply"),
    "unknown KL weighting": ({}, {"space": {"vae.kl_weight": {"type": "categorical", "choices": ["uniform", "per_item"]}}},
                             "refuses"),
    "pia.weight 0": ({}, {"space": {"pia.weight": {"type": "float", "low": 0.0, "high": 1.0}}}, "turns PIA off"),
    "empty space": ({}, {"space": {}}, "space is empty"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_search_is_refused_before_anything_runs(case: str, home: Path, synth_snapshot: str) -> None:
    from pipeline.io import registry

    job_kw, search_kw, message = BAD[case]
    job = tiny(synth_snapshot, search=search(**search_kw), **job_kw)
    with pytest.raises(DataError, match=message) as e:
        job.run()
    assert e.value.fix  # names the fix
    c = registry.client()
    assert c.search_registered_models() == []
    assert c.search_runs([x.experiment_id for x in c.search_experiments()]) == []  # no run was even started


def test_sample_config_fits_the_weekly_job_and_the_cli_passes_it_on(home: Path, synth_snapshot: str, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.cli.main import main
    from pipeline.training.search import check_search
    from pipeline.training.train_job import TrainJob

    cfg = load_search_config(REPO / "configs" / "search.yaml")
    assert {"vae.beta_max", "vae.dropout", "pia.weight", "lr"} <= set(cfg.space)
    check_search(TrainJob(snapshot=synth_snapshot, search=cfg))  # the weekly job's defaults: multivae-pia + twin
    small = tmp_path / "search.yaml"
    small.write_text("budget_seconds: 10\nmin_trial_seconds: 60\nspace: {vae.dropout: {type: float, low: 0.2, high: 0.6}}\n")
    rc = main(["train", "--snapshot", synth_snapshot, "--search", str(small), "--device", "cpu", "--registered-name", NAME])
    assert rc == 2 and "not one trial fits" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("space: {lr: {type: float, low: 0.1}}\n")  # no high
    assert main(["train", "--snapshot", synth_snapshot, "--search", str(bad)]) == 2
    assert "search config" in capsys.readouterr().err


def test_list_choices_are_searched_as_values(synth_snapshot: str) -> None:
    """vae.hidden_dims choices are lists: Optuna sees their JSON text, the job gets the list back (no training)."""
    import optuna

    from pipeline.training.search import Choices, _start_params, _suggest, check_search, with_job_overrides

    space = {"vae.hidden_dims": {"type": "categorical", "choices": [[16], [32], [16, 8]]}}
    job = tiny(synth_snapshot, search=search(space=space))
    check_search(job)
    r = job.search.space["vae.hidden_dims"]
    assert isinstance(r, Choices)
    assert _start_params(job, job.search.space) == {"vae.hidden_dims": "[32]"}  # the job's (32,) is a choice
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    drawn = {tuple(_suggest(study.ask(), "vae.hidden_dims", r)) for _ in range(20)}
    assert drawn == {(16,), (32,), (16, 8)}
    assert with_job_overrides(job, {"vae.hidden_dims": [16, 8]}).vae.hidden_dims == (16, 8)


def test_recvae_settings_are_searched_and_reach_the_model(synth_snapshot: str) -> None:
    """recvae.* keys (width, latent size, dropout, γ) apply to RecVAE: accepted in the space, and a trial's value is
    what the built model trains with (no training here)."""
    from model.recvae import RecVAEConfig
    from pipeline.training.search import check_search, tuned_setup
    from pipeline.training.train_job import _set_up

    space = {"recvae.hidden_dim": {"type": "categorical", "choices": [8, 16]},
             "recvae.gamma": {"type": "float", "low": 0.001, "high": 0.02, "log": True}}
    job = tiny(synth_snapshot, model="recvae-pia", search=search(space=space), recvae=RecVAEConfig(hidden_dim=16))
    check_search(job)
    s = _set_up(job, tracking=False)  # loads the snapshot; no MLflow run
    assert s.build("recvae-pia").model_config == RecVAEConfig(hidden_dim=16)
    trial = tuned_setup(s, {"recvae.hidden_dim": 8, "recvae.gamma": 0.01})
    assert trial.build("recvae-pia").model_config == RecVAEConfig(hidden_dim=8, gamma=0.01)
    assert trial.build("recvae").model_config == RecVAEConfig(hidden_dim=8, gamma=0.01)  # the twin too


def test_trainer_settings_are_searched_and_reach_the_trainer(synth_snapshot: str) -> None:
    """lr, batch_size, the plateau decay (lr_decay, lr_decay_patience) and the weights' moving average
    (ema_halflife) are TrainJob keys the search tunes: a trial's values are what its trainer runs with (no training
    here); a decay outside (0, 1] is refused."""
    from pipeline.training.search import check_search, tuned_setup
    from pipeline.training.train_job import _set_up

    space = {"lr_decay": {"type": "categorical", "choices": [1.0, 0.5]},
             "lr_decay_patience": {"type": "int", "low": 2, "high": 5},
             "batch_size": {"type": "categorical", "choices": [50, 100]},
             "ema_halflife": {"type": "categorical", "choices": [None, 3.0]}}
    job = tiny(synth_snapshot, search=search(space=space), lr_decay=0.7)
    check_search(job)
    s = _set_up(job, tracking=False)
    assert (s.train_cfg.lr_decay, s.train_cfg.lr_decay_patience) == (0.7, 3)  # the job's own values by default
    assert s.train_cfg.ema_halflife is None
    trial = tuned_setup(s, {"lr_decay": 0.5, "lr_decay_patience": 2, "batch_size": 50, "ema_halflife": 3.0})
    assert (trial.train_cfg.lr_decay, trial.train_cfg.lr_decay_patience, trial.train_cfg.batch_size) == (0.5, 2, 50)
    assert trial.train_cfg.ema_halflife == 3.0
    assert _set_up(tiny(synth_snapshot, ema_halflife=2.0), tracking=False).train_cfg.ema_halflife == 2.0  # no search
    bad = tiny(synth_snapshot, search=search(space={"lr_decay": {"type": "float", "low": 0.5, "high": 2.0}}))
    with pytest.raises(DataError, match=r"search.space.lr_decay: the job refuses lr_decay=2.0"):
        check_search(bad)


def test_the_kl_weighting_is_searched_and_reaches_the_model(synth_snapshot: str) -> None:
    """vae.kl_weight (uniform / count, model.vae.kl_user_weight) is a choice of the search for a Multi-VAE and its
    twin; a trial's choice is what the built model trains with (no training here)."""
    from pipeline.training.search import check_search, tuned_setup
    from pipeline.training.train_job import _set_up

    space = {"vae.kl_weight": {"type": "categorical", "choices": ["uniform", "count"]}}
    job = tiny(synth_snapshot, search=search(space=space))
    check_search(job)
    s = _set_up(job, tracking=False)
    assert s.build("multivae-pia").model_config.kl_weight == "uniform"  # the default
    trial = tuned_setup(s, {"vae.kl_weight": "count"})
    assert trial.build("multivae-pia").model_config.kl_weight == "count"
    assert trial.build("multivae").model_config.kl_weight == "count"  # the twin too
