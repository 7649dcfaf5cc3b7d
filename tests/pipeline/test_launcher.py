"""The training launcher: validation, the local backend (subprocess and in-process), SageMaker against moto on loopback."""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from pipeline.launcher import (
    SM_SNAPSHOT_DIR,
    LaunchError,
    LocalConfig,
    LocalLauncher,
    SageMakerConfig,
    SageMakerLauncher,
    TrainingFailed,
    TrainingTimeout,
    TrainJob,
    cli_args,
    job_name,
    make_launcher,
    run,
)

IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/recsys-train:0.1.0"
ROLE = "arn:aws:iam::123456789012:role/recsys-training"


def _job(**kw: Any) -> TrainJob:
    base: dict[str, Any] = {"name": "weekly-train-20240107", "snapshot": "s3://lake-bucket/snapshots/as_of=2024-01-07",
                            "output": "s3://mlflow-bucket/sagemaker-output/", "hyperparameters": {"epochs": 200, "bf16": True}}
    return TrainJob(**{**base, **kw})


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("name", ["", "-lead", "trail-", "has_underscore", "dot.name", "x" * 64, "sp ace"])
def test_bad_job_names_rejected(name: str) -> None:
    with pytest.raises(ValidationError, match="job name"):
        _job(name=name)


@pytest.mark.parametrize("name", ["a", "weekly-train-20240107", "A--b9", "x" * 63])
def test_good_job_names_accepted(name: str) -> None:
    assert _job(name=name).name == name


@pytest.mark.parametrize("uri", ["s3://", "s3://UPPER/x", "s3://ab/x", "s3://a..b/x", "s3://192.168.1.1/x",
                                 "s3://bucket/a//b", "s3://bucket/a\nb", "s3://-bucket/x"])
def test_bad_s3_uris_rejected(uri: str) -> None:
    with pytest.raises(ValidationError):
        _job(snapshot=uri)


@pytest.mark.parametrize("hp", [{"Epochs": 1}, {"epochs; rm": 1}, {"1x": 1}, {"note": "a\nb"}])
def test_bad_hyperparameters_rejected(hp: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        _job(hyperparameters=hp)


def test_credentials_in_env_rejected() -> None:
    with pytest.raises(ValidationError, match="credential"):
        _job(env={"AWS_SECRET_ACCESS_KEY": "x"})
    assert _job(env={"MLFLOW_TRACKING_URI": "http://mlflow:5000"}).env["MLFLOW_TRACKING_URI"]


@pytest.mark.parametrize("field,value", [("image_uri", "docker.io/library/python:3.11"),
                                         ("image_uri", "123456789012.dkr.ecr.us-east-1.amazonaws.com/recsys-train"),
                                         ("role_arn", "arn:aws:iam::12345:role/x"), ("role_arn", "recsys-training"),
                                         ("instance_type", "g5.xlarge")])
def test_bad_sagemaker_config_rejected(field: str, value: str) -> None:
    ok = {"image_uri": IMAGE, "role_arn": ROLE}
    with pytest.raises(ValidationError):
        SageMakerConfig(**{**ok, field: value})


def test_cli_args_mapping() -> None:
    job = _job(hyperparameters={"pia_lambda": 0.1, "epochs": 5, "bf16": True, "compare_base": False, "model": "multivae-pia"})
    assert cli_args(job) == ["train", "--snapshot=s3://lake-bucket/snapshots/as_of=2024-01-07", "--bf16", "--epochs=5",
                             "--model=multivae-pia", "--pia-lambda=0.1"]


def test_job_name_helper() -> None:
    assert job_name("weekly-train", datetime(2024, 1, 7, 3, 4, 5, tzinfo=UTC)) == "weekly-train-20240107-030405"
    with pytest.raises(ValueError, match="job name"):
        job_name("bad_prefix")


# ---------------------------------------------------------------- local backend


def test_local_subprocess_success(tmp_path: Path) -> None:
    marker = tmp_path / "argv.txt"
    # The "trainer" writes the argv it got, so the test sees the exact CLI mapping the subprocess received.
    code = f"import sys, pathlib; pathlib.Path({str(marker)!r}).write_text(' '.join(sys.argv[1:]))"
    cfg = LocalConfig(command=(sys.executable, "-c", code), log_dir=tmp_path / "logs")
    launcher = LocalLauncher(cfg)
    job = _job(snapshot=str(tmp_path), output=None, hyperparameters={"epochs": 3})
    res = launcher.launch(job)
    assert res.backend == "local" and res.handle.isdigit()
    out = launcher.wait(res, timeout_s=30)
    assert out.status == "Completed" and out.duration_s >= 0
    assert marker.read_text() == f"train --snapshot={tmp_path} --epochs=3"


def test_local_subprocess_failure_reports_exit_code_and_log(tmp_path: Path) -> None:
    code = "import sys; print('loading snapshot'); sys.stderr.write('boom: snapshot missing\\n'); sys.exit(3)"
    launcher = LocalLauncher(LocalConfig(command=(sys.executable, "-c", code), log_dir=tmp_path))
    res = launcher.launch(_job(snapshot=str(tmp_path)))
    with pytest.raises(TrainingFailed, match=r"exit code 3") as ei:
        launcher.wait(res, timeout_s=30)
    assert "boom: snapshot missing" in str(ei.value) and "loading snapshot" in str(ei.value)


def test_local_missing_executable_is_a_clear_error(tmp_path: Path) -> None:
    launcher = LocalLauncher(LocalConfig(command=(str(tmp_path / "no-such-recsys"),), log_dir=tmp_path))
    with pytest.raises(LaunchError, match="cannot start"):
        launcher.launch(_job(snapshot=str(tmp_path)))


def test_local_timeout_then_process_is_still_tracked(tmp_path: Path) -> None:
    launcher = LocalLauncher(LocalConfig(command=(sys.executable, "-c", "import time; time.sleep(30)"), log_dir=tmp_path))
    res = launcher.launch(_job(snapshot=str(tmp_path)))
    try:
        with pytest.raises(TrainingTimeout, match="still running"):
            launcher.wait(res, timeout_s=0.2)
    finally:
        launcher._procs[res.job_name].kill()  # the test started it; end it by its handle
        launcher._procs[res.job_name].wait()


def test_local_duplicate_name_rejected(tmp_path: Path) -> None:
    launcher = LocalLauncher(runner=lambda argv: 0)
    launcher.launch(_job(snapshot=str(tmp_path)))
    with pytest.raises(LaunchError, match="already launched"):
        launcher.launch(_job(snapshot=str(tmp_path)))


def test_in_process_runner(tmp_path: Path) -> None:
    seen: list[list[str]] = []

    def ok(argv: list[str]) -> int:
        seen.append(argv)
        return 0

    out = run(_job(snapshot=str(tmp_path), hyperparameters={"epochs": 1}), LocalConfig(), extra={"runner": ok})
    assert out.status == "Completed" and seen == [["train", f"--snapshot={tmp_path}", "--epochs=1"]]

    def bad(argv: list[str]) -> int:
        raise RuntimeError("CUDA not available")

    launcher = LocalLauncher(runner=bad)
    with pytest.raises(TrainingFailed, match="RuntimeError: CUDA not available"):
        launcher.wait(launcher.launch(_job(snapshot=str(tmp_path))))
    launcher = LocalLauncher(runner=lambda argv: 2)
    with pytest.raises(TrainingFailed, match="exit code 2"):
        launcher.wait(launcher.launch(_job(snapshot=str(tmp_path))))


# ---------------------------------------------------------------- SageMaker on moto (127.0.0.1, never real AWS)


@pytest.fixture()
def moto_endpoint(moto_server: str) -> str:
    """The session's moto server on 127.0.0.1 (tests/conftest.py): dummy credentials, never real AWS."""
    return moto_server


def test_sagemaker_launch_and_wait_on_moto(moto_endpoint: str) -> None:
    cfg = SageMakerConfig(image_uri=IMAGE, role_arn=ROLE, endpoint_url=moto_endpoint)
    launcher = make_launcher(cfg)
    assert isinstance(launcher, SageMakerLauncher)
    job = _job(hyperparameters={"epochs": 200, "pia_lambda": 0.1, "bf16": True}, env={"MLFLOW_TRACKING_URI": "http://mlflow:5000"})
    res = launcher.launch(job)
    assert res.backend == "sagemaker"
    assert res.handle == "arn:aws:sagemaker:us-east-1:123456789012:training-job/weekly-train-20240107"
    out = launcher.wait(res, timeout_s=10, poll_s=0.01)
    assert out.status == "Completed"
    assert out.model_artifacts == "s3://mlflow-bucket/sagemaker-output/weekly-train-20240107/output/model.tar.gz"

    desc = launcher.client.describe_training_job(TrainingJobName=job.name)
    assert desc["RoleArn"] == ROLE
    assert desc["ResourceConfig"]["InstanceType"] == "ml.g5.xlarge"
    assert desc["AlgorithmSpecification"]["TrainingImage"] == IMAGE
    assert desc["AlgorithmSpecification"]["ContainerEntrypoint"] == ["recsys"]
    assert desc["AlgorithmSpecification"]["ContainerArguments"] == [
        "train", f"--snapshot={SM_SNAPSHOT_DIR}", "--bf16", "--epochs=200", "--pia-lambda=0.1"]
    assert desc["HyperParameters"] == {"bf16": "True", "epochs": "200", "pia_lambda": "0.1"}
    channel = desc["InputDataConfig"][0]
    assert channel["ChannelName"] == "snapshot"
    assert channel["DataSource"]["S3DataSource"]["S3Uri"] == "s3://lake-bucket/snapshots/as_of=2024-01-07/"


def test_sagemaker_needs_s3_locations() -> None:
    launcher = SageMakerLauncher(SageMakerConfig(image_uri=IMAGE, role_arn=ROLE), client=object())
    with pytest.raises(LaunchError, match="s3:// snapshot"):
        launcher.request(_job(snapshot="/local/snapshot"))
    with pytest.raises(LaunchError, match="s3:// output"):
        launcher.request(_job(output=None))


class _FakeSageMaker:
    """Plays a status sequence: moto completes jobs at once, so the polling and failure paths need a scripted client."""

    def __init__(self, statuses: list[str], reason: str = "") -> None:
        self.statuses, self.reason, self.calls = statuses, reason, 0

    def create_training_job(self, **req: Any) -> dict[str, str]:
        return {"TrainingJobArn": f"arn:aws:sagemaker:us-east-1:123456789012:training-job/{req['TrainingJobName']}"}

    def describe_training_job(self, TrainingJobName: str) -> dict[str, Any]:
        status = self.statuses[min(self.calls, len(self.statuses) - 1)]
        self.calls += 1
        now = datetime.now(UTC)
        d: dict[str, Any] = {"TrainingJobStatus": status, "TrainingStartTime": now - timedelta(seconds=90),
                             "TrainingEndTime": now}
        if self.reason:
            d["FailureReason"] = self.reason
        return d


def test_sagemaker_wait_polls_until_terminal() -> None:
    fake = _FakeSageMaker(["InProgress", "InProgress", "Completed"])
    sleeps: list[float] = []
    launcher = SageMakerLauncher(SageMakerConfig(image_uri=IMAGE, role_arn=ROLE), client=fake, sleep=sleeps.append)
    out = launcher.wait(launcher.launch(_job()), poll_s=5)
    assert out.status == "Completed" and fake.calls == 3 and sleeps == [5, 5]
    assert out.duration_s == pytest.approx(90, abs=1)


def test_sagemaker_failure_carries_reason() -> None:
    fake = _FakeSageMaker(["InProgress", "Failed"], reason="AlgorithmError: recsys train exited 2: snapshot has no manifest")
    launcher = SageMakerLauncher(SageMakerConfig(image_uri=IMAGE, role_arn=ROLE), client=fake, sleep=lambda s: None)
    with pytest.raises(TrainingFailed, match=r"failed: AlgorithmError: .*no manifest"):
        launcher.wait(launcher.launch(_job()))


def test_sagemaker_timeout() -> None:
    launcher = SageMakerLauncher(SageMakerConfig(image_uri=IMAGE, role_arn=ROLE), client=_FakeSageMaker(["InProgress"]),
                                 sleep=lambda s: None)
    with pytest.raises(TrainingTimeout, match="still InProgress"):
        launcher.wait(launcher.launch(_job()), timeout_s=0)


def test_sagemaker_service_error_is_wrapped(moto_endpoint: str) -> None:
    launcher = SageMakerLauncher(SageMakerConfig(image_uri=IMAGE, role_arn=ROLE, endpoint_url=moto_endpoint))
    with pytest.raises(LaunchError, match="DescribeTrainingJob never-launched failed"):
        launcher.wait(launcher.launch(_job()).model_copy(update={"job_name": "never-launched"}), timeout_s=1)
