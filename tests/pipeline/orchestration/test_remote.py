"""pipeline.orchestration.remote: a typed job staged as an envelope, run by the entry point elsewhere, its typed result
(or its one-line error) read back. The entry point runs as a real subprocess (`python -m ...`), as an engine runs
it; the in-process cases replace a job's `run` with a recorder to check the envelope's round trip without Spark."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.data.build_matrix import BuildMatrixJob, BuildResult
from pipeline.errors import DataError
from pipeline.io.lake import resolve
from pipeline.orchestration import remote
from pipeline.serving.job import InferJob
from pipeline.training.train_job import TrainJob


def _build(tmp_path: Path, **kw) -> BuildMatrixJob:
    return BuildMatrixJob(**({"events": str(tmp_path / "events"), "as_of": dt.date(2026, 1, 17), "out": str(tmp_path / "lake"),
                              "window_days": 14} | kw))


def _run_entry(uri: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline.orchestration.remote", uri], capture_output=True, text=True,
                          timeout=120, check=False)


def test_the_envelope_round_trips_every_job_kind(tmp_path: Path) -> None:
    jobs = [_build(tmp_path), TrainJob(snapshot=str(tmp_path / "snap"), epochs=3),
            InferJob(date=dt.date(2026, 1, 17), events="ev", out="out", top_n=7)]
    for job in jobs:
        env = remote.JobEnvelope.of(job)
        assert type(env.build()) is type(job) and env.build() == job


def test_a_job_runs_from_its_envelope_and_its_typed_result_comes_back(tmp_path: Path, monkeypatch) -> None:
    seen: list[BuildMatrixJob] = []

    def run(self: BuildMatrixJob) -> BuildResult:
        seen.append(self)
        return BuildResult(snapshot_uri=self.snapshot_uri(), digest="abc", counts={"users": 3})

    monkeypatch.setattr(BuildMatrixJob, "run", run)
    job = _build(tmp_path, seed=7)
    uri = remote.stage(job, str(tmp_path / "staging" / "weekly" / "run1" / "build_matrix"))
    assert uri.endswith("/envelope.json")
    outcome = remote.execute(uri)
    assert outcome.ok and seen == [job]
    result = remote.collect(uri)
    assert isinstance(result, BuildResult) and result.digest == "abc" and result.snapshot_uri == job.snapshot_uri()


def test_a_failing_remote_job_writes_its_one_line_error_and_exits_nonzero(tmp_path: Path) -> None:
    uri = remote.stage(_build(tmp_path), str(tmp_path / "staging"))  # no events folder: the build refuses
    r = _run_entry(uri)
    assert r.returncode == 1
    assert "recsys remote job failed: DataError: events location" in r.stderr
    with pytest.raises(remote.RemoteJobFailed, match=r"remote build_matrix job failed: DataError: events location .* Fix:"):
        remote.collect(uri)
    assert not (tmp_path / "lake" / "snapshots").exists()  # nothing published


def test_an_invalid_config_in_the_envelope_is_refused_by_the_remote_side(tmp_path: Path) -> None:
    folder = tmp_path / "staging"
    folder.mkdir()
    good = json.loads(remote.JobEnvelope.of(_build(tmp_path)).model_dump_json())
    good["job"]["window_days"] = 0
    (folder / "envelope.json").write_text(json.dumps(good))
    r = _run_entry(str(folder / "envelope.json"))
    assert r.returncode == 1
    with pytest.raises(remote.RemoteJobFailed, match=r"invalid job config: window_days: Input should be greater than"):
        remote.collect(str(folder / "envelope.json"))


def test_a_retry_never_reads_the_previous_try_s_outcome(tmp_path: Path, monkeypatch) -> None:
    uri = remote.stage(_build(tmp_path), str(tmp_path / "staging"))
    assert _run_entry(uri).returncode == 1  # first try fails and leaves its outcome
    out = Path(uri).with_name("outcome.json")
    assert out.exists()

    def killed(self: BuildMatrixJob) -> BuildResult:  # the second try dies before it writes anything
        assert not out.exists(), "the stale outcome must be gone before the job runs"
        raise KeyboardInterrupt

    monkeypatch.setattr(BuildMatrixJob, "run", killed)
    with pytest.raises(KeyboardInterrupt):
        remote.execute(uri)
    assert json.loads(out.read_text())["error_type"] == "KeyboardInterrupt"
    out.unlink()  # a try killed outright leaves nothing: collect says so and names the fix
    with pytest.raises(remote.RemoteJobFailed, match=r"left no outcome .* see the engine's log"):
        remote.collect(uri)


def test_staging_again_clears_an_old_outcome(tmp_path: Path) -> None:
    uri = remote.stage(_build(tmp_path), str(tmp_path / "staging"))
    Path(uri).with_name("outcome.json").write_text('{"kind": "build_matrix", "ok": false, "error": "old"}')
    remote.stage(_build(tmp_path), str(tmp_path / "staging"))
    assert not Path(uri).with_name("outcome.json").exists()


def test_credentials_never_go_into_an_envelope(tmp_path: Path) -> None:
    job = TrainJob(snapshot=str(tmp_path / "snap"), tracking_uri="https://alice:s3cret@mlflow.example.com")
    with pytest.raises(DataError, match=r"carries credentials.*MLFLOW_TRACKING_USERNAME"):
        remote.stage(job, str(tmp_path / "staging"))
    assert not (tmp_path / "staging").exists()


def test_collect_refuses_what_is_not_an_envelope_or_an_outcome(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is not a staged envelope"):
        remote.collect(str(tmp_path / "job.json"))
    uri = remote.stage(_build(tmp_path), str(tmp_path / "staging"))
    Path(uri).with_name("outcome.json").write_text("{not json")
    with pytest.raises(remote.RemoteJobFailed, match="is not an outcome this version writes"):
        remote.collect(uri)


def test_explain_failure_prefers_the_remote_message(tmp_path: Path) -> None:
    uri = remote.stage(_build(tmp_path), str(tmp_path / "staging"))
    engine_error = RuntimeError("Cannot execute: spark-submit ... Error code is: 1")
    assert remote.explain_failure(uri, engine_error) is engine_error  # no outcome: the engine's own error
    _run_entry(uri)
    explained = remote.explain_failure(uri, engine_error)
    assert isinstance(explained, remote.RemoteJobFailed) and "events location" in str(explained)


def test_staging_keys_from_scheduler_names_are_safe_paths() -> None:
    key = remote.staging_key("weekly_train", "scheduled__2026-01-18T00:00:00+00:00", "build_matrix")
    assert key == "weekly_train/scheduled__2026-01-18T00_00_00_00_00/build_matrix"
    assert remote.staging_key("..", "a/b", "") == "_/a_b/_"


def test_envelopes_and_outcomes_live_on_s3_too(s3_bucket: str, monkeypatch, tmp_path: Path) -> None:
    def run(self: BuildMatrixJob) -> BuildResult:
        return BuildResult(snapshot_uri=self.snapshot_uri(), digest="d", counts={})

    monkeypatch.setattr(BuildMatrixJob, "run", run)
    uri = remote.stage(_build(tmp_path, out=f"{s3_bucket}/lake"), f"{s3_bucket}/lake/_jobs/weekly/r1/build_matrix")
    assert uri.startswith("s3://") and resolve(uri).exists()
    remote.execute(uri)
    assert remote.collect(uri).snapshot_uri == f"{s3_bucket}/lake/snapshots/as_of=2026-01-17"  # type: ignore[attr-defined]
