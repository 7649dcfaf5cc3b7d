"""The daily run in MLflow, against the real `mlflow server` fixture (tests/conftest.py: SQLite backend, artifacts in
moto S3): one run per publish in `recsys-daily`, tagged with the date, version and committed run, with the metrics and
the HTML report; a blocked publish gets its own run, tagged blocked; the served version's recorded coverage is the
reference of coverage_vs_gate. Without a tracking URI nothing is logged and no ./mlruns or SQLite file appears."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from infer_support import events_table, run_infer, tiny_bundle, write_events_local

from pipeline.errors import DataError
from pipeline.serving.job import InferJob, publish_recommendations
from pipeline.serving.monitoring import MonitorConfig

DAY = dt.date(2024, 5, 3)
NAME = "monitoring-test-model"


def job(events: str, out: Path, **kw: Any) -> InferJob:
    base: dict[str, Any] = {"date": DAY, "events": events, "out": str(out), "device": "cpu", "progress": False,
                            "top_n": 5, "shard_events": 100}
    return InferJob(**(base | kw))


def test_daily_runs_metrics_report_and_the_gate_reference_on_a_server(mlflow_server: str, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the job's tracking_uri is what counts
    c = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    # a registered version as training and the gate leave it: test.* tags, the gate's metrics on its run
    exp = c.create_experiment("monitoring-test-train")
    train_run = c.create_run(exp).info.run_id
    c.log_metric(train_run, "gate.candidate.coverage_at_5", 0.4)
    c.set_terminated(train_run)
    c.create_registered_model(NAME)
    mv = c.create_model_version(NAME, f"runs:/{train_run}/model", run_id=train_run,
                                tags={"run_id": train_run, "test.coverage_at_5": "0.3", "test.coverage_at_20": "0.9"})
    model = f"models:/{NAME}/{mv.version}"
    events = write_events_local(events_table(n_users=60), tmp_path / "events")
    bundle = tiny_bundle()

    m = run_infer(job(events, tmp_path / "out", model=model, tracking_uri=mlflow_server), bundle, str(mv.version))
    mon = m["monitoring"]
    # the gate's measurement wins over training's tag; K is the largest recorded <= top_n
    assert mon["gate"]["k"] == 5 and mon["gate"]["reference"] == 0.4 and "gate.candidate" in mon["gate"]["source"]
    assert mon["metrics"]["coverage_vs_gate"] == pytest.approx(mon["gate"]["today"] / 0.4, abs=1e-6)

    daily = c.get_experiment_by_name("recsys-daily")
    assert daily is not None
    # the server is the session's: other tests' publishes log daily runs too, so find this publish's own
    runs = c.search_runs([daily.experiment_id], filter_string=f"tags.run = '{m['run']}'")
    assert len(runs) == 1
    run = runs[0]
    tags = run.data.tags
    assert (tags["date"], tags["model_version"], tags["model_uri"], tags["run"], tags["status"]) == (
        DAY.isoformat(), str(mv.version), model, m["run"], "committed")
    assert tags["partition"].endswith(f"recommendations/dt={DAY}") and tags["monitor.verdict"] == "ok"
    metrics = run.data.metrics
    for key in ("users", "fallback_rate", "coverage", "gini", "top1pct_share", "score_p50", "coverage_vs_gate"):
        assert metrics[key] == pytest.approx(mon["metrics"][key], abs=1e-6), key
    assert metrics["score.model.p95"] == pytest.approx(mon["scores"]["model"]["p95"])
    arts = {a.path for a in c.list_artifacts(run.info.run_id, "monitoring")}
    assert arts == {"monitoring/monitoring_report.html", "monitoring/monitoring.json"}
    html = Path(c.download_artifacts(run.info.run_id, "monitoring/monitoring_report.html", str(tmp_path))).read_text()
    assert f"Daily output {DAY}" in html and "coverage_vs_gate" in html

    # a blocked publish: nothing committed, but its run is there to investigate
    strict = MonitorConfig(rules={"coverage_vs_gate": {"min": {"value": 100.0, "action": "block"}}})
    with pytest.raises(DataError, match=r"coverage_vs_gate = .* is below the minimum 100"):
        publish_recommendations(job(events, tmp_path / "out", model=model, tracking_uri=mlflow_server, monitor=strict),
                                bundle, str(mv.version))
    blocked = [r for r in c.search_runs([daily.experiment_id], filter_string=f"tags.model_uri = '{model}'")
               if r.data.tags.get("status") == "blocked"]
    assert len(blocked) == 1 and blocked[0].data.metrics["findings.block"] == 1.0


def test_without_a_tracking_uri_nothing_is_logged_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    events = write_events_local(events_table(n_users=30), tmp_path / "events")
    caplog.set_level("INFO", logger="pipeline.serving.monitoring")
    m = run_infer(job(events, tmp_path / "out", model="models:/some-model@champion"), tiny_bundle(), "3")
    assert m["monitoring"]["verdict"] == "ok" and m["monitoring"]["gate"] == {}
    assert "no MLflow tracking URI configured" in caplog.text
    assert list(cwd.iterdir()) == [] and not (tmp_path / "home" / "mlflow.db").exists()
