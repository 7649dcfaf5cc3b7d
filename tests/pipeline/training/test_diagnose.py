"""DiagnoseJob / `recsys diagnose`, the training job's diagnostics step and the latent gate, on the tiny registered
versions of conftest (trained once per session, with the no-PIA twin for `good`) and a real SQLite MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from pipeline.errors import DataError
from pipeline.training.diagnose import DiagnoseJob, run_metrics
from pipeline.training.gates import GateConfig, check
from tests.pipeline.training.conftest import NAME, gate

SMALL = {"users": 40, "views": 3, "neighbours": 5}


def _client():
    from pipeline.io import registry

    return registry.client()


def _artifacts(run_id: str, path: str = "diagnostics") -> set[str]:
    return {Path(f.path).name for f in _client().list_artifacts(run_id, path)}


def test_training_logs_diagnostics_for_the_model_and_its_twin(trained: dict[str, str]) -> None:
    run = _client().get_run(trained["good_run"])
    m = run.data.metrics
    assert m["diag.users"] == 60 and m["diag.views"] == 8  # capped at the 60 validation users
    assert 0 <= m["diag.active_units"] <= 8 and m["diag.kl_mean"] > 0 and 0 <= m["diag.knn_jaccard"] <= 1
    assert "diag.compare.multivae.drift" in m and "diag.group.11-50.drift" in m
    # the PIA anchors exist at training time only: measured here (never from a bundle), not for the no-PIA twin
    assert m["diag.anchor_distance"] > 0 and "diag.compare.multivae.anchor_distance" not in m
    assert run.data.tags["diag.status"] == "all diagnostics applied"
    assert {"summary.json", "twin.json", "drift_by_group.png", "w2_near_far.png", "active_units.png"} <= \
        _artifacts(trained["good_run"])


def test_diagnose_a_registered_version_logs_metrics_and_plots(trained: dict[str, str], tmp_path: Path) -> None:
    run_id = trained["good_run"]
    before = len(_client().get_metric_history(run_id, "diag.drift"))
    r = DiagnoseJob(model=f"models:/{NAME}/{trained['good']}", out=tmp_path, **SMALL).run()
    assert r.applicable and r.version == trained["good"] and r.run_id == run_id
    assert r.metrics["users"] == 40 and "compare.multivae.drift" in r.metrics  # the twin stored at training
    assert "anchor distance not measured" in r.reason  # a bundle holds no anchors
    assert len(_client().get_metric_history(run_id, "diag.drift")) == before + 1
    assert _client().get_metric_history(run_id, "diag.drift")[-1].value == pytest.approx(r.metrics["drift"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["models"]) == ["multivae-pia", "multivae"]  # side by side in the plots
    assert {"w2_near_far.png", "drift_by_group.png", "active_units.png"} <= {p.name for p in tmp_path.iterdir()}
    again = DiagnoseJob(model=f"models:/{NAME}/{trained['good']}", log_to_run=False, **SMALL).run()
    assert again.run_id is None and again.metrics == r.metrics  # deterministic for a seed


@pytest.mark.parametrize("kw, match", [
    ({"users": 10_000}, "only|validation users"),
    ({"users": 5, "neighbours": 5}, "neighbours"),
])
def test_bad_samples_are_one_line_and_log_nothing(trained: dict[str, str], kw: dict, match: str) -> None:
    run_id = trained["good_run"]
    before = len(_client().get_metric_history(run_id, "diag.drift"))
    with pytest.raises(DataError, match=match) as e:
        DiagnoseJob(model=f"models:/{NAME}/{trained['good']}", **(SMALL | kw)).run()
    assert "\n" not in str(e.value) and "Fix:" in str(e.value)
    assert len(_client().get_metric_history(run_id, "diag.drift")) == before


def test_zero_views_and_unknown_models_are_refused(trained: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        DiagnoseJob(model=f"models:/{NAME}/1", views=0)
    with pytest.raises(DataError, match="neither a models:/ URI nor a bundle folder"):
        DiagnoseJob(model=str(tmp_path / "nope")).run()
    with pytest.raises(DataError, match="no version 99"):
        DiagnoseJob(model=f"models:/{NAME}/99").run()


def _bundle(name: str, snapshot: str, d: Path, **kw: object) -> Path:
    from model.recommenders import make_recommender
    from model.train import TrainConfig
    from pipeline.io.bundle import ModelBundle
    from pipeline.io.snapshot import load_snapshot

    snap = load_snapshot(snapshot)
    rec = make_recommender(name, train=TrainConfig(epochs=1, device="cpu", progress=False), **kw)  # type: ignore[arg-type]
    rec.fit(snap.train, snap.valid)
    return ModelBundle(rec, snap.item_ids, snap.item_popularity(), name, {"snapshot": snapshot}).save(d / name)


def test_models_without_a_gaussian_posterior(synth_snapshot: str, tmp_path: Path) -> None:
    from model.vae import dae_config

    ease = DiagnoseJob(model=str(_bundle("ease", synth_snapshot, tmp_path)), **SMALL).run()
    assert not ease.applicable and "not applicable" in ease.reason and ease.metrics == {}
    dae = DiagnoseJob(model=str(_bundle("multidae", synth_snapshot, tmp_path, model_config=dae_config(latent_dim=8))),
                      **SMALL).run()  # the snapshot comes from the bundle's config
    assert dae.applicable and dae.run_id is None and "KL not applicable" in dae.reason
    assert "kl_mean" not in dae.metrics and dae.metrics["drift"] > 0


def test_latent_gate_is_off_by_default_and_fails_a_collapse(trained: dict[str, str], easy_gates: GateConfig) -> None:
    assert GateConfig().latent_floors == {}
    assert not [v for v in check(GateConfig(), {"ndcg@100": 1.0, "recall@20": 1, "recall@50": 1, "coverage@20": 1},
                                 None, {}, 0, 0) if v.gate.startswith("latent.")]
    diag = run_metrics(trained["good_run"])
    ok = gate(trained["good"], mode="dry-run", gates=easy_gates.model_copy(update={"latent_floors": {"active_units": 1}}))
    assert [(v.gate, v.status) for v in ok.verdicts if v.gate.startswith("latent.")] == [("latent.active_units", "pass")]
    floor = {"active_units": diag["active_units"] + 1, "kl_mean": diag["kl_mean"] * 2}
    bad = gate(trained["good"], mode="dry-run", gates=easy_gates.model_copy(update={"latent_floors": floor}))
    assert not bad.passed
    assert {v.gate: v.status for v in bad.verdicts if v.gate.startswith("latent.")} == \
        {"latent.active_units": "fail", "latent.kl_mean": "fail"}
    assert "latent.active_units" in bad.report


def test_latent_gate_fails_closed_without_diagnostics() -> None:
    cfg = GateConfig(latent_floors={"kl_mean": 0.1})
    out = [v for v in check(cfg, {"ndcg@100": 1.0, "recall@20": 1, "recall@50": 1, "coverage@20": 1}, None, {}, 0, 0,
                            diagnostics={}) if v.gate.startswith("latent.")]
    assert out[0].status == "fail" and "recsys diagnose" in out[0].detail
    with pytest.raises(ValidationError, match="unknown latent floor"):
        GateConfig(latent_floors={"units": 3})


def test_cli(trained: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.cli.main import main

    assert main(["diagnose", "--model", f"models:/{NAME}/{trained['good']}", "--users", "30", "--views", "2",
                 "--neighbours", "3", "--no-log"]) == 0
    out = capsys.readouterr().out
    assert "drift=" in out and "active_units=" in out and "not logged" in out
    assert main(["diagnose", "--model", f"models:/{NAME}/{trained['good']}", "--views", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "views" in err[0]
    assert main(["diagnose", "--model", f"models:/{NAME}/{trained['good']}", "--users", "100000"]) == 2
    assert "validation users" in capsys.readouterr().err
