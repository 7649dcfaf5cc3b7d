"""pipeline.orchestration.steps: settings from the environment, each step builds its typed job from the settings and
the previous step's result (or its XCom JSON), and a failed step's message carries no credentials.

The jobs' own work is tested in their packages and end to end in tests/dags and tests/integration; here each job's
`run` is replaced by a recorder, to check what the step asked for without Spark, MLflow or torch.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Any

import pytest

import pipeline.orchestration.steps as steps
from pipeline.data.build_matrix import BuildMatrixJob, BuildResult
from pipeline.errors import DataError
from pipeline.serving.job import InferJob, InferResult
from pipeline.training.gate import GateJob, GateResult
from pipeline.training.gates import GateCheck
from pipeline.training.train_job import TrainJob, TrainResult

SECRET_URI = "https://alice:s3cret@mlflow.example.com/?token=t0k"


def settings(tmp_path: Path, **kw: Any) -> steps.Settings:
    return steps.Settings(**({"home": tmp_path, "events_uri": "ev", "lake_uri": "lake", "recs_uri": "recs",
                              "tracking_uri": "sqlite:///t.db"} | kw))


@pytest.fixture
def ran(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every job a step runs, recorded; each returns a plausible result."""
    jobs: list[Any] = []

    def build(self: BuildMatrixJob) -> BuildResult:
        jobs.append(self)
        return BuildResult(snapshot_uri=f"{self.out}/snapshots/as_of={self.as_of}", digest="d1", counts={"users": 3})

    def train(self: TrainJob) -> TrainResult:
        jobs.append(self)
        return TrainResult(model_name=self.registered_name, version="7", run_id="r1", metrics={"test.ndcg_at_100": 0.4})

    def gate(self: GateJob) -> GateResult:
        jobs.append(self)
        ok = self.version != "13"
        return GateResult(model_name=self.model_name, version=self.version, passed=ok, promoted=ok and self.mode == "enabled",
                          champion="6", verdicts=[GateCheck(gate="ndcg@100", status="pass" if ok else "fail", detail="")],
                          metrics={}, report="", warnings=[])

    def infer(self: InferJob) -> InferResult:
        jobs.append(self)
        return InferResult(partition_uri=f"{self.out}/recommendations/dt={self.date}", date=self.date, model_name="m",
                           model_version="7", users=5, fallback_users=0, unknown_item_events=0, files=1,
                           precision="fp32", seconds=0.1, run="run-1", version=0, events=9)

    for cls, fn in ((BuildMatrixJob, build), (TrainJob, train), (GateJob, gate), (InferJob, infer)):
        monkeypatch.setattr(cls, "run", fn)
    return jobs


def test_settings_default_under_recsys_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("RECSYS_EVENTS_URI", "RECSYS_LAKE_URI", "RECSYS_RECS_URI", "MLFLOW_TRACKING_URI", "RECSYS_TRAIN_CONFIG",
              "RECSYS_MODEL_NAME"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))
    s = steps.Settings.from_env()
    assert s.events_uri == str(tmp_path / "events") and s.lake_uri == str(tmp_path / "lake")
    assert s.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db" and s.model_name == "recsys-multivae-pia"
    monkeypatch.setenv("RECSYS_LAKE_URI", "s3://lake/prod")
    assert steps.Settings.from_env().lake_uri == "s3://lake/prod"


def test_the_weekly_chain_passes_typed_results_through_their_json(tmp_path: Path, ran: list[Any]) -> None:
    train_yaml = tmp_path / "train.yaml"
    train_yaml.write_text("epochs: 3\nregistered_name: from-yaml\ndevice: cuda\n")
    s = settings(tmp_path, train_config=str(train_yaml), device="cpu", model_name="recsys-x", tracking_uri="http://m:5000")
    built = steps.build_matrix(s, dt.date(2026, 1, 17))
    trained = steps.train(s, built.to_xcom())  # what Airflow's XCom hands the next task: JSON, not the object
    verdict = steps.gate(s, trained.to_xcom())
    build_job, train_job, gate_job = ran
    assert (build_job.events, build_job.out, build_job.as_of, build_job.window_days) == ("ev", "lake", dt.date(2026, 1, 17), 365)
    # the YAML's keys, with the settings' device, registered name and tracking URI over them
    assert train_job.snapshot == built.snapshot_uri == "lake/snapshots/as_of=2026-01-17" and train_job.epochs == 3
    assert (train_job.device, train_job.registered_name, train_job.tracking_uri) == ("cpu", "recsys-x", "http://m:5000")
    assert (gate_job.model_name, gate_job.version, gate_job.mode, gate_job.tracking_uri) == ("recsys-x", "7", "enabled",
                                                                                         "http://m:5000")
    assert verdict.passed and verdict.promoted
    assert TrainResult.model_validate(trained.to_xcom()) == trained and BuildResult.model_validate(built.to_xcom()) == built


def test_a_rejected_candidate_fails_the_step_unless_dry_run(tmp_path: Path, ran: list[Any]) -> None:
    trained = {"model_name": "m", "version": "13", "run_id": "r", "metrics": {}}
    with pytest.raises(steps.GateRejected, match=r"m version 13 failed its gates \(ndcg@100\); champion stays 6"):
        steps.gate(settings(tmp_path), trained)
    assert not steps.gate(settings(tmp_path, gate_mode="dry-run"), trained).passed  # recorded, not a failed task


def test_gate_reads_the_gate_config_file(tmp_path: Path, ran: list[Any]) -> None:
    (tmp_path / "gates.yaml").write_text("allow_missing_baselines: true\n")
    steps.gate(settings(tmp_path, gate_config=str(tmp_path / "gates.yaml")), {"model_name": "m", "version": "3",
                                                                             "run_id": "r", "metrics": {}})
    steps.gate(settings(tmp_path), {"model_name": "m", "version": "4", "run_id": "r", "metrics": {}})
    assert ran[0].gates.allow_missing_baselines and not ran[1].gates.allow_missing_baselines


def test_infer_names_the_champion_and_the_registry_without_touching_the_environment(
        tmp_path: Path, ran: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    r = steps.infer(settings(tmp_path, model_name="recsys-x", top_n=20, tracking_uri="http://m:5000"), "2026-01-17")
    job = ran[0]
    assert (job.model, job.tracking_uri, job.date, job.top_n) == ("models:/recsys-x@champion", "http://m:5000",
                                                                  dt.date(2026, 1, 17), 20)
    assert "MLFLOW_TRACKING_URI" not in os.environ  # the registry reaches the job as a field, not a global
    assert r.partition_uri == "recs/recommendations/dt=2026-01-17"


@pytest.mark.parametrize("bad", ["2026-02-30", "yesterday", "2026-1-1; rm -rf /", ""])
def test_bad_dates_are_clear_errors_before_any_job_runs(tmp_path: Path, ran: list[Any], bad: str) -> None:
    with pytest.raises(DataError, match="date"):
        steps.infer(settings(tmp_path), bad)
    with pytest.raises(DataError, match="date"):
        steps.build_matrix(settings(tmp_path), bad)
    assert ran == []


def test_a_failing_step_never_shows_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def unreachable(self: GateJob) -> GateResult:
        raise ConnectionError(f"API request to {SECRET_URI}api/2.0/mlflow/registered-models/get failed")

    monkeypatch.setattr(GateJob, "run", unreachable)
    with pytest.raises(steps.StepFailed) as e:
        steps.gate(settings(tmp_path, tracking_uri=SECRET_URI), {"model_name": "m", "version": "3", "run_id": "r",
                                                                  "metrics": {}})
    text = str(e.value)
    assert not [w for w in ("alice", "s3cret", "t0k") if w in text]
    assert text.startswith("ConnectionError: API request to https://mlflow.example.com/") and e.value.__cause__ is None

    def plain(self: GateJob) -> GateResult:
        raise DataError("no version 3 of registered model 'm'", "check --model/--model-version")

    monkeypatch.setattr(GateJob, "run", plain)
    with pytest.raises(DataError, match="no version 3"):  # nothing secret: the original error, traceback and all
        steps.gate(settings(tmp_path, tracking_uri=SECRET_URI), {"model_name": "m", "version": "3", "run_id": "r",
                                                                  "metrics": {}})


def test_serving_defaults_to_the_name_training_registers() -> None:
    from pipeline.serving.options import DEFAULT_MODEL
    from pipeline.training import DEFAULT_REGISTERED_NAME

    # serving may not import training (import graph): the two constants are kept equal here
    assert f"models:/{DEFAULT_REGISTERED_NAME}@champion" == DEFAULT_MODEL
    assert steps.Settings(home=Path("."), events_uri="e", lake_uri="l", recs_uri="r",
                          tracking_uri="t").model_name == DEFAULT_REGISTERED_NAME


def test_the_embedded_profile_runs_everything_in_process(tmp_path: Path) -> None:
    s = settings(tmp_path)
    assert steps.infer_job(s, "2026-01-17").engine == "local"
    assert steps.train_job(s, {"snapshot_uri": "snap", "digest": "d", "counts": {}}).distributed is None


def test_the_spark_profile_launches_training_onto_the_cluster_and_scores_with_the_spark_engine(tmp_path: Path) -> None:
    s = settings(tmp_path, profile="spark", spark_master="spark://10.0.0.1:7077", train_processes=4, train_gpu=True,
                 spark_driver_host="10.0.0.9", spark_conf={"spark.executor.memory": "4g"})
    job = steps.train_job(s, {"snapshot_uri": "snap", "digest": "d", "counts": {}})
    assert job.distributed is not None and job.distributed.num_processes == 4 and job.distributed.use_gpu
    assert job.distributed.spark_master == "spark://10.0.0.1:7077"
    built = steps.build_matrix_job(s, "2026-01-17")
    assert built.spark.master == "spark://10.0.0.1:7077" and built.spark_master == "spark://10.0.0.1:7077"
    assert built.spark.driver_host == "10.0.0.9" and built.spark.settings()["spark.executor.memory"] == "4g"
    scoring = steps.infer_job(s, "2026-01-17")
    assert scoring.engine == "spark" and scoring.spark is not None and scoring.spark.master == "spark://10.0.0.1:7077"


def test_stage_writes_the_job_under_the_staging_area_by_dag_run_and_task(tmp_path: Path) -> None:
    from pipeline.orchestration import remote

    s = settings(tmp_path, lake_uri=str(tmp_path / "lake"))
    uri = steps.stage(s, steps.infer_job(s, "2026-01-17"), "daily_inference", "manual__2026-01-17T00:00:00+00:00", "infer")
    assert uri == f"{tmp_path}/lake/_jobs/daily_inference/manual__2026-01-17T00_00_00_00_00/infer/envelope.json"
    assert remote.JobEnvelope.model_validate_json(Path(uri).read_text()).build() == steps.infer_job(s, "2026-01-17")


def test_the_daily_step_restricts_to_the_dates_availability_list_when_one_is_set(tmp_path: Path) -> None:
    assert steps.infer_job(settings(tmp_path), "2026-01-17").availability is None  # unset: every item
    s = settings(tmp_path, availability_uri="s3://lake/availability/dt={date}/")
    assert steps.infer_job(s, "2026-01-17").availability == "s3://lake/availability/dt=2026-01-17/"
    assert steps.infer_job(s, "2026-01-18").availability == "s3://lake/availability/dt=2026-01-18/"


def test_the_daily_step_passes_the_dates_exclusion_list_when_one_is_set(tmp_path: Path) -> None:
    assert steps.infer_job(settings(tmp_path), "2026-01-17").exclusions is None  # unset: nobody excludes anything
    s = settings(tmp_path, exclusions_uri="s3://lake/exclusions/dt={date}/")
    assert steps.infer_job(s, "2026-01-17").exclusions == "s3://lake/exclusions/dt=2026-01-17/"
    assert steps.infer_job(s, "2026-01-18").exclusions == "s3://lake/exclusions/dt=2026-01-18/"
    assert steps.infer_job(s, "2026-01-18").availability is None  # the two lists are independent


def test_the_weekly_build_joins_the_dates_items_when_published(tmp_path: Path) -> None:
    """<lake>/items/dt=AS_OF (recsys ingest --format items) goes into the snapshot, so training fits a cold head;
    a date without one builds as before."""
    s = settings(tmp_path, lake_uri=str(tmp_path / "lake"))
    assert steps.build_matrix_job(s, "2026-01-17").items is None
    day = tmp_path / "lake" / "items" / "dt=2026-01-17"
    day.mkdir(parents=True)
    (day / "part-0.parquet").write_bytes(b"")
    assert steps.build_matrix_job(s, "2026-01-17").items == str(day)
    assert steps.build_matrix_job(s, "2026-01-18").items is None  # another date's catalogue is not used


def test_the_candidates_step_takes_the_settings_and_fails_when_none_passes(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """RECSYS_CANDIDATES_CONFIG: the file's candidates on the build's snapshot, with the settings' name, registry,
    gate mode, thresholds, ledger and device; none promoted in enabled mode fails the step (as a failed gate does)."""
    from pipeline.training.candidates import CandidateOutcome, CandidatesJob, CandidatesResult

    (tmp_path / "cands.yaml").write_text("common: {epochs: 3}\ncandidates:\n  - {model: multivae-pia}\n  - {model: ease}\n")
    (tmp_path / "gates.yaml").write_text("allow_missing_baselines: true\n")
    s = settings(tmp_path, candidates_config=str(tmp_path / "cands.yaml"), gate_config=str(tmp_path / "gates.yaml"),
                 device="cpu", model_name="recsys-x")
    build = {"snapshot_uri": "lake/snapshots/as_of=2026-01-17", "digest": "d", "counts": {}}
    job = steps.candidates_job(s, build)
    assert job.snapshot == "lake/snapshots/as_of=2026-01-17" and job.registered_name == "recsys-x"
    assert job.mode == "enabled" and job.ledger_uri == s.ledger and job.tracking_uri == "sqlite:///t.db"
    assert job.gates.allow_missing_baselines and job.common == {"epochs": 3, "device": "cpu"}
    assert [j.model for j in job.train_jobs("g")] == ["multivae-pia", "ease"]
    failed = [GateCheck(gate="ndcg@100", status="fail", detail="")]
    outcome = CandidateOutcome(index=0, version="8", model="ease", run_id="r", primary=0.1, metrics={},
                               verdicts=failed, passed=False, promoted=False)
    monkeypatch.setattr(CandidatesJob, "run", lambda self: CandidatesResult(
        model_name=self.registered_name, group="g", primary="ndcg@100", promoted=None, champion="6",
        candidates=[outcome]))
    with pytest.raises(steps.GateRejected, match=r"no candidate of recsys-x passed .*ease v8: ndcg@100.*champion stays 6"):
        steps.train_candidates(s, build)
    assert steps.train_candidates(settings(tmp_path, candidates_config=str(tmp_path / "cands.yaml"),
                                           gate_mode="dry-run"), build).promoted is None  # recorded, not failed


def test_the_daily_step_reads_the_dates_catalogue_and_the_model_budget(tmp_path: Path) -> None:
    s = settings(tmp_path, lake_uri=str(tmp_path / "lake"), max_model_mb=2048)
    job = steps.infer_job(s, "2026-01-17")
    assert job.items == str(tmp_path / "lake" / "items" / "dt=2026-01-17") and job.max_model_mb == 2048
    assert steps.infer_job(settings(tmp_path), "2026-01-17").max_model_mb is None  # the machine's default
