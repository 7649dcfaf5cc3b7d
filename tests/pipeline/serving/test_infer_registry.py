"""Inference through the MLflow registry: models:/NAME@champion is resolved once, to the version every row names,
against the job's own tracking URI (no MLFLOW_TRACKING_URI needed: an environment pointing elsewhere is ignored)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from infer_support import events_table, tiny_bundle, write_events

from pipeline.serving.job import InferJob
from pipeline.serving.recs import read_recommendations


@pytest.mark.slow
def test_infer_from_the_champion_alias(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    from pipeline.io import registry
    from pipeline.io.pyfunc import BundleModel

    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    registry.setup()
    exp = registry.ensure_experiment("infer-test")
    bundle = tiny_bundle()
    bundle_dir = bundle.save(tmp_path / "bundle")
    versions = []
    for _ in range(2):  # two versions; the alias points at the second
        with mlflow.start_run(experiment_id=exp):
            info = mlflow.pyfunc.log_model(name="model", python_model=BundleModel(), artifacts={"bundle": str(bundle_dir)})
        versions.append(registry.register(info.model_uri, "recs-test", {"snapshot": "s"}))
    registry.client().set_registered_model_alias("recs-test", registry.CHAMPION, versions[1])
    events = write_events(events_table(n_users=20), str(tmp_path / "events"))
    tracking = registry.tracking_uri()
    elsewhere = tmp_path / "elsewhere.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{elsewhere}")  # not the registry the job names
    job = InferJob(date=dt.date(2024, 5, 3), events=events, out=str(tmp_path / "lake"), model="models:/recs-test@champion",
                   tracking_uri=tracking, device="cpu", top_n=5, progress=False)
    r = job.run()
    got = read_recommendations(str(tmp_path / "lake"), "latest")
    assert r.model_version == versions[1] == "2" and r.model_name == "recs-test" and not elsewhere.exists()
    assert set(got["model_version"].to_pylist()) == {"2"} and got.num_rows == r.users
    assert r.partition_uri == str(tmp_path / "lake" / "recommendations" / "dt=2024-05-03")
    assert InferJob.model_validate(job.model_dump()) == job and r.to_xcom()["date"] == "2024-05-03"
