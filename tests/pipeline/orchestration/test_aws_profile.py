"""The `aws` profile's operators against a moto server on 127.0.0.1 (never real AWS), run the way Airflow runs them:
`execute()` until it defers, the trigger serialized and rebuilt as the triggerer does, its `run()` polling moto until
a terminal state, then the operator's `next_method` with the trigger's event.

What moto cannot do, faked as narrowly as possible (`fake_compute`): moto's EMR Serverless job runs are SUCCESS and
its SageMaker training jobs Completed the moment they are created, and nothing runs in them. The fake wraps moto's
own backend calls (the server runs in this process) so that a new job run / training job is RUNNING / InProgress,
then runs the real entry point (`pipeline.orchestration.remote.main`) on the envelope URI the operator passed to the
service (the job driver's entryPointArguments; the training job's ContainerEntrypoint + ContainerArguments), and
sets the job's terminal state from its exit code. Everything else (the operators' API calls, the triggers'
polling, S3 staging and outcomes, IAM roles, ECR images) is moto's.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import boto3
import pytest

ACCOUNT = "123456789012"  # moto's
REGION = "us-east-1"
IMAGE_REPO = "recsys-train"
IMAGE = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/{IMAGE_REPO}:abc1234"
POLL = 1  # seconds between the triggers' polls
SECRET = f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:recsys/test/mlflow-AbC123"  # the MLflow credentials' secret


@pytest.fixture(scope="module")
def aws(moto_server: str) -> Iterator[dict[str, Any]]:
    """Roles, an EMR Serverless application, the training image, a lake bucket, and the Airflow connection
    `aws_default` pointing the operators' hooks at moto."""
    import os
    import uuid

    kw = {"endpoint_url": moto_server, "region_name": REGION}
    iam, emr, ecr, s3 = (boto3.client(s, **kw) for s in ("iam", "emr-serverless", "ecr", "s3"))
    trust = json.dumps({"Version": "2012-10-17", "Statement": []})
    suffix = uuid.uuid4().hex[:6]
    roles = {}
    for r in ("spark-build", "inference", "training"):
        roles[r] = iam.create_role(RoleName=f"recsys-test-{r}-{suffix}", AssumeRolePolicyDocument=trust)["Role"]["Arn"]
    # moto 5.2.5 knows only emr-N.N.0 labels, not the stack's emr-spark-8.0.0; the operators never read it
    app = emr.create_application(name=f"recsys-test-{suffix}", releaseLabel="emr-7.9.0", type="SPARK",
                                 tags={"project": "recsys"})["applicationId"]
    with contextlib.suppress(ecr.exceptions.RepositoryAlreadyExistsException):
        ecr.create_repository(repositoryName=IMAGE_REPO)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                           "config": {"digest": "sha256:" + "0" * 64, "size": 1, "mediaType": "x"}, "layers": []})
    ecr.put_image(repositoryName=IMAGE_REPO, imageManifest=manifest, imageTag="abc1234")
    bucket = f"lake-{suffix}"
    s3.create_bucket(Bucket=bucket)
    old = os.environ.get("AIRFLOW_CONN_AWS_DEFAULT")
    os.environ["AIRFLOW_CONN_AWS_DEFAULT"] = json.dumps(
        {"conn_type": "aws", "extra": {"endpoint_url": moto_server, "region_name": REGION}})
    try:
        yield {"roles": roles, "app": app, "bucket": bucket, "kw": kw, "endpoint": moto_server}
    finally:
        # moto servers in one process share their backends: leave no bucket behind for tests that list them all
        lake = boto3.resource("s3", **kw).Bucket(bucket)
        lake.object_versions.delete()
        lake.delete()
        if old is None:
            os.environ.pop("AIRFLOW_CONN_AWS_DEFAULT", None)
        else:
            os.environ["AIRFLOW_CONN_AWS_DEFAULT"] = old


def _env(aws: dict[str, Any], **over: str) -> dict[str, str]:
    env = {"REGION": REGION, "EMR_APPLICATION_ID": aws["app"], "EMR_BUILD_ROLE_ARN": aws["roles"]["spark-build"],
           "EMR_INFER_ROLE_ARN": aws["roles"]["inference"], "EMR_ENTRY_POINT": "local:///opt/recsys/remote.py",
           "SPARK_SUBMIT_PARAMETERS": "--conf spark.executor.cores=4", "EMR_LOG_URI": f"s3://{aws['bucket']}/emr-logs",
           "TRAINING_ROLE_ARN": aws["roles"]["training"], "TRAINING_IMAGE_URI": IMAGE,
           "TRAINING_OUTPUT_URI": f"s3://{aws['bucket']}/sagemaker-output", "POLL_SECONDS": str(POLL), **over}
    return {f"RECSYS_AWS_{k}": v for k, v in env.items()}


def _profile(aws: dict[str, Any], **over: str):
    from pipeline.orchestration.aws import AwsProfile

    return AwsProfile.from_env(_env(aws, **over))


class _TI:
    """The task instance fields the operators read (names, the try) and XCom pushes of their extra links."""

    def __init__(self, task_id: str, try_number: int = 1) -> None:
        self.dag_id, self.task_id, self.map_index, self.try_number = "weekly_train", task_id, -1, try_number
        self.xcom: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any, **_: Any) -> None:
        self.xcom[key] = value


def _context(task_id: str, try_number: int = 1) -> dict[str, Any]:
    ti = _TI(task_id, try_number)
    return {"ti": ti, "task_instance": ti, "run_id": "scheduled__2026-01-04T00:00:00+00:00",
            "dag_run": SimpleNamespace(run_id="scheduled__2026-01-04T00:00:00+00:00"), "dag": SimpleNamespace(dag_id=ti.dag_id)}


async def _first_event(trigger: Any) -> Any:
    async for event in trigger.run():
        return event
    raise AssertionError("the trigger ended without an event")


def run_like_airflow(op: Any, context: dict[str, Any], deferred: list[str] | None = None) -> Any:
    """execute → (defer → the trigger, rebuilt from its serialized form, polls → next_method)* → the task's result."""
    import importlib

    from airflow.sdk.exceptions import TaskDeferred

    deferred = [] if deferred is None else deferred
    pristine = copy.deepcopy(op)
    call = functools.partial(op.execute, context)
    for _ in range(5):
        try:
            return call()
        except TaskDeferred as d:
            classpath, params = d.trigger.serialize()
            module, _, name = classpath.rpartition(".")
            trigger = getattr(importlib.import_module(module), name)(**params)  # what the triggerer does
            event = asyncio.run(asyncio.wait_for(_first_event(trigger), timeout=60))
            deferred.append(type(trigger).__name__)
            # the task resumes in a new process: a fresh operator, given only the deferral's kwargs and the event
            fresh = copy.deepcopy(pristine)
            call = functools.partial(fresh.resume_execution, d.method_name, {**(d.kwargs or {}), "event": event.payload},
                                     context)
    raise AssertionError("deferred too many times")


# -- the fake compute: moto's jobs start RUNNING, the real entry point runs on the envelope, the state follows --

class FakeCompute:
    def __init__(self) -> None:
        self.ran: list[list[str]] = []
        self.threads: list[threading.Thread] = []
        self.entry_point = True  # False: the job just succeeds (its result is the collect task's business)
        self.delay = POLL * 1.5  # the trigger sees the job running at least once

    def run_later(self, argv: list[str], done: Any) -> None:
        def go() -> None:
            from pipeline.orchestration import remote

            time.sleep(self.delay)
            self.ran.append(argv)
            done(remote.main(argv) if self.entry_point else 0)

        t = threading.Thread(target=go, daemon=True)
        t.start()
        self.threads.append(t)


@pytest.fixture
def fake_compute(monkeypatch: pytest.MonkeyPatch) -> FakeCompute:
    from moto.emrserverless.models import EMRServerlessBackend
    from moto.sagemaker.models import SageMakerModelBackend

    compute = FakeCompute()
    start_job_run, create_training_job = EMRServerlessBackend.start_job_run, SageMakerModelBackend.create_training_job

    def _start_job_run(self: Any, *a: Any, **k: Any) -> Any:
        run = start_job_run(self, *a, **k)
        run.state = "RUNNING"
        submit = run.job_driver["sparkSubmit"]

        def done(rc: int) -> None:
            run.state = "SUCCESS" if rc == 0 else "FAILED"
            if rc:  # what EMR Serverless says of a driver that exited non-zero
                run.state_details = "Job failed, please check complete logs in configured logging destination. ExitCode: 1."

        compute.run_later(list(submit["entryPointArguments"]), done)
        return run

    def _create_training_job(self: Any, *a: Any, **k: Any) -> Any:
        job = create_training_job(self, *a, **k)
        job.training_job_status, job.secondary_status = "InProgress", "Training"
        spec = job.algorithm_specification
        assert spec["ContainerEntrypoint"] == ["python", "-m", "pipeline.orchestration.remote"], spec

        def done(rc: int) -> None:
            job.training_job_status = job.secondary_status = "Completed" if rc == 0 else "Failed"
            if rc:  # SageMaker's reason for a container that exited non-zero (remote.py also writes /opt/ml/output/failure)
                job.failure_reason = "AlgorithmError: see the training job's log, exit code: 1"

        compute.run_later(list(spec["ContainerArguments"]), done)
        return job

    monkeypatch.setattr(EMRServerlessBackend, "start_job_run", _start_job_run)
    monkeypatch.setattr(SageMakerModelBackend, "create_training_job", _create_training_job)
    return compute


def _stage_failing_train(aws: dict[str, Any], key: str) -> str:
    """A real envelope whose job fails fast on the remote side: training on a snapshot that was never built."""
    from pipeline.orchestration.remote import stage
    from pipeline.training.train_job import TrainJob

    job = TrainJob(snapshot=f"s3://{aws['bucket']}/snapshots/as_of=2026-01-03", device="cpu",
                   tracking_uri="sqlite:////nonexistent/mlflow.db")
    return stage(job, f"s3://{aws['bucket']}/_jobs/{key}")


def _stage_any(aws: dict[str, Any], key: str) -> str:
    """A staged envelope for a job that will not run (success is the service's word here)."""
    from pipeline.orchestration.remote import stage
    from pipeline.training.train_job import TrainJob

    return stage(TrainJob(snapshot=f"s3://{aws['bucket']}/snapshots/x", device="cpu"), f"s3://{aws['bucket']}/_jobs/{key}")


# -- configuration ---------------------------------------------------------------------------------------------

def test_profile_from_env_validates_each_setting(aws: dict[str, Any]) -> None:
    from pipeline.errors import DataError
    from pipeline.orchestration.aws import AwsProfile

    p = _profile(aws)
    assert p.training_instance_type == "ml.g5.xlarge" and p.emr_log_uri == f"s3://{aws['bucket']}/emr-logs"
    bad = {"TRAINING_ROLE_ARN": "recsys-training", "TRAINING_IMAGE_URI": IMAGE.replace(":abc1234", ":latest"),
           "TRAINING_INSTANCE_TYPE": "ml.m5.xlarge", "EMR_ENTRY_POINT": "s3://b/remote.sh", "REGION": "mars-1",
           "TRAINING_OUTPUT_URI": "/tmp/out", "TRAINING_INSTANCE_COUNT": "2"}
    for key, value in bad.items():
        with pytest.raises(DataError) as e:
            AwsProfile.from_env(_env(aws, **{key: value}))
        line = str(e.value)
        assert f"RECSYS_AWS_{key} is not valid" in line and "\n" not in line and "Fix: set" in line, line
    env = _env(aws)
    del env["RECSYS_AWS_TRAINING_ROLE_ARN"]
    with pytest.raises(DataError, match="RECSYS_AWS_TRAINING_ROLE_ARN is not valid: Field required"):
        AwsProfile.from_env(env)
    with pytest.raises(DataError, match="SageMaker pulls from the job's own region"):
        AwsProfile.from_env(_env(aws, TRAINING_IMAGE_URI=IMAGE.replace(REGION, "eu-west-1")))
    # the MLflow secret: a complete Secrets Manager ARN in the profile's region, or unset / empty
    assert p.mlflow_secret_arn is None and _profile(aws, MLFLOW_SECRET_ARN="").mlflow_secret_arn is None
    assert _profile(aws, MLFLOW_SECRET_ARN=SECRET).mlflow_secret_arn == SECRET
    for value in (SECRET.rsplit("-", 1)[0], SECRET.replace("secretsmanager", "ssm"), "recsys/prod/mlflow"):
        with pytest.raises(DataError, match=r"RECSYS_AWS_MLFLOW_SECRET_ARN is not valid: .* complete ARN"):
            AwsProfile.from_env(_env(aws, MLFLOW_SECRET_ARN=value))
    with pytest.raises(DataError, match="RECSYS_AWS_MLFLOW_SECRET_ARN is not valid: the MLflow secret is in eu-west-1"):
        AwsProfile.from_env(_env(aws, MLFLOW_SECRET_ARN=SECRET.replace(REGION, "eu-west-1")))


def test_job_names_unique_per_try_and_stable_within_one() -> None:
    import re

    from pipeline.orchestration.aws import client_token, remote_job_name

    run = "scheduled__2026-01-04T00:00:00+00:00"
    a = remote_job_name("recsys", "weekly_train", run, "train_run", -1, 1)
    assert a == remote_job_name("recsys", "weekly_train", run, "train_run", -1, 1)
    assert a != remote_job_name("recsys", "weekly_train", run, "train_run", -1, 2)
    assert a != remote_job_name("recsys", "weekly_train", "manual__x", "train_run", -1, 1)
    assert a.startswith("recsys-train-run-") and a.endswith("-t1")
    long = remote_job_name("recsys", "d" * 300, run, "t_" * 100, 7, 12)
    for name in (a, long):
        assert len(name) <= 63 and re.fullmatch(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}", name), name
    assert client_token("d", run, "t", -1, 1) == client_token("d", run, "t", -1, 1) != client_token("d", run, "t", -1, 2)
    assert len(client_token("d", run, "t", -1, 1)) <= 64


# -- EMR Serverless ------------------------------------------------------------------------------------------

def test_emr_job_runs_remote_py_on_the_envelope_and_succeeds(aws: dict[str, Any]) -> None:
    from pipeline.orchestration.aws import client_token, emr_serverless_job, remote_job_name

    uri = _stage_any(aws, "emr-ok")
    op = emr_serverless_job("build_matrix_run", uri, _profile(aws))
    ctx = _context("build_matrix_run")
    boto3.client("emr-serverless", **aws["kw"]).stop_application(applicationId=aws["app"])  # auto-stopped when idle
    deferred: list[str] = []
    job_id = run_like_airflow(op, ctx, deferred)  # moto's job run is SUCCESS at once: the trigger's first poll ends it
    assert deferred == ["EmrServerlessApplicationTrigger", "EmrServerlessJobTrigger"]  # started the app, then the job
    run = boto3.client("emr-serverless", **aws["kw"]).get_job_run(applicationId=aws["app"], jobRunId=job_id)["jobRun"]
    submit = run["jobDriver"]["sparkSubmit"]
    assert submit == {"entryPoint": "local:///opt/recsys/remote.py", "entryPointArguments": [uri],
                      "sparkSubmitParameters": "--conf spark.executor.cores=4"}
    assert run["executionRole"] == aws["roles"]["spark-build"] and run["tags"] == {"project": "recsys"}
    assert run["name"] == remote_job_name("recsys", "weekly_train", ctx["run_id"], "build_matrix_run", -1, 1)
    from moto.emrserverless.models import emrserverless_backends

    (stored,) = [r for r in emrserverless_backends[ACCOUNT][REGION].job_runs[aws["app"]] if r.id == job_id]
    assert stored.client_token == client_token("weekly_train", ctx["run_id"], "build_matrix_run", -1, 1)
    # the daily step runs under the inference role
    assert emr_serverless_job("infer_run", uri, _profile(aws)).execution_role_arn == aws["roles"]["inference"]


def test_emr_failed_remote_job_fails_the_task_with_the_remote_message(aws: dict[str, Any], fake_compute: FakeCompute) -> None:
    from pipeline.orchestration.aws import emr_serverless_job
    from pipeline.orchestration.remote import RemoteJobFailed

    uri = _stage_failing_train(aws, "emr-fail")
    op = emr_serverless_job("build_matrix_run", uri, _profile(aws))
    t0 = time.monotonic()
    deferred: list[str] = []
    with pytest.raises(RemoteJobFailed) as e:
        run_like_airflow(op, _context("build_matrix_run"), deferred)
    line = str(e.value)
    assert deferred == ["EmrServerlessJobTrigger"] and fake_compute.ran == [[uri]]  # the entry point ran on the envelope
    assert "no published snapshot at s3://" in line and "Fix: pass the folder of a snapshot" in line, line
    assert "EMR Serverless job run" in line and "FAILED" in line and "\n" not in line, line
    assert time.monotonic() - t0 >= POLL  # polled while RUNNING, then saw FAILED


def test_emr_missing_application_or_role_is_one_line(aws: dict[str, Any]) -> None:
    from pipeline.errors import DataError
    from pipeline.orchestration.aws import emr_serverless_job

    uri = _stage_any(aws, "emr-missing")
    missing_role = aws["roles"]["spark-build"].rsplit("/", 1)[0] + "/recsys-dev-nope"
    with pytest.raises(DataError, match=r"IAM role .*recsys-dev-nope does not exist\. Fix: deploy infra/iam.yaml"):
        run_like_airflow(emr_serverless_job("build_matrix_run", uri, _profile(aws, EMR_BUILD_ROLE_ARN=missing_role)),
                         _context("build_matrix_run"))
    with pytest.raises(DataError) as e:
        run_like_airflow(emr_serverless_job("build_matrix_run", uri, _profile(aws, EMR_APPLICATION_ID="00nosuchapp")),
                         _context("build_matrix_run"))
    assert "ResourceNotFoundException" in str(e.value) and "RECSYS_AWS_EMR_APPLICATION_ID" in str(e.value), str(e.value)


# -- SageMaker -------------------------------------------------------------------------------------------------

def _training_jobs(aws: dict[str, Any]) -> list[str]:
    return [j["TrainingJobName"] for j in boto3.client("sagemaker", **aws["kw"]).list_training_jobs()["TrainingJobSummaries"]]


def test_training_job_succeeds_and_a_resumed_try_attaches_to_its_job(aws: dict[str, Any], fake_compute: FakeCompute) -> None:
    from pipeline.orchestration.aws import remote_job_name, training_job

    uri = _stage_any(aws, "sm-ok")
    ctx = _context("train_run")
    op = training_job("train_run", uri, _profile(aws))
    fake_compute.entry_point = False
    out = run_like_airflow(op, ctx)
    name = remote_job_name("recsys", "weekly_train", ctx["run_id"], "train_run", -1, 1)
    desc = out["Training"]
    assert desc["TrainingJobName"] == name and desc["TrainingJobStatus"] == "Completed"
    spec = desc["AlgorithmSpecification"]
    assert spec["TrainingImage"] == IMAGE and spec["ContainerArguments"] == [uri]
    assert desc["RoleArn"] == aws["roles"]["training"] and desc["ResourceConfig"]["InstanceType"] == "ml.g5.xlarge"
    assert fake_compute.ran == [[uri]]
    # the same try again (its worker was lost before it deferred): no second job, it waits for the first
    n = len(_training_jobs(aws))
    assert run_like_airflow(training_job("train_run", uri, _profile(aws)), _context("train_run"))["Training"][
        "TrainingJobName"] == name
    assert len(_training_jobs(aws)) == n and fake_compute.ran == [[uri]]


def test_training_failed_remote_job_fails_the_task_with_the_remote_message(aws: dict[str, Any],
                                                                           fake_compute: FakeCompute) -> None:
    from pipeline.orchestration.aws import training_job
    from pipeline.orchestration.remote import RemoteJobFailed

    uri = _stage_failing_train(aws, "sm-fail")
    fake_compute.delay = 4  # still InProgress when the operator looks right after creating it: it defers
    deferred: list[str] = []
    with pytest.raises(RemoteJobFailed) as e:
        run_like_airflow(training_job("train_run", uri, _profile(aws)), _context("train_run", try_number=3), deferred)
    line = str(e.value)
    assert deferred == ["SageMakerJobTrigger"] and fake_compute.ran == [[uri]]
    assert "remote train job failed: DataError: no published snapshot at s3://" in line, line
    assert "SageMaker training job recsys-train-run-" in line and "-t3 Failed: AlgorithmError" in line, line
    assert "\n" not in line


def test_training_wait_timeout_stops_the_job(aws: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The wait gives up (max attempts): the job is stopped rather than left running, and the task says so.
    moto implements no StopTrainingJob: the fake below is that one API call (it sets the job Stopping)."""
    from moto.sagemaker.models import SageMakerModelBackend, sagemaker_backends
    from moto.sagemaker.responses import SageMakerResponse

    from pipeline.orchestration.aws import training_job
    from pipeline.orchestration.remote import RemoteJobFailed

    create = SageMakerModelBackend.create_training_job

    def _stuck(self: Any, *a: Any, **k: Any) -> Any:
        job = create(self, *a, **k)
        job.training_job_status = "InProgress"  # and nothing ever finishes it
        return job

    def _stop(self: Any) -> str:
        name = json.loads(self.body)["TrainingJobName"]
        sagemaker_backends[ACCOUNT][REGION].training_jobs[name].training_job_status = "Stopping"
        return "{}"

    monkeypatch.setattr(SageMakerModelBackend, "create_training_job", _stuck)
    monkeypatch.setattr(SageMakerResponse, "stop_training_job", _stop, raising=False)
    uri = _stage_any(aws, "sm-timeout")
    op = training_job("train_timeout_run", uri, _profile(aws))
    op.max_attempts = 2
    with pytest.raises(RemoteJobFailed) as e:
        run_like_airflow(op, _context("train_timeout_run"))
    assert "still running when the wait timed out, stopped" in str(e.value) and "left no outcome" in str(e.value), str(e.value)
    (name,) = [n for n in _training_jobs(aws) if n.startswith("recsys-train-timeout-run-")]
    status = boto3.client("sagemaker", **aws["kw"]).describe_training_job(TrainingJobName=name)["TrainingJobStatus"]
    assert status in ("Stopping", "Stopped"), status


def test_missing_training_image_or_role_fails_before_any_job(aws: dict[str, Any]) -> None:
    from pipeline.errors import DataError
    from pipeline.orchestration.aws import training_job

    uri = _stage_any(aws, "sm-missing")
    before = _training_jobs(aws)
    cases = {
        "TRAINING_IMAGE_URI": (IMAGE.replace(":abc1234", ":notpushed"), r"training image .*:notpushed is not in ECR\. "
                               r"Fix: build docker/train.Dockerfile and push it"),
        "TRAINING_ROLE_ARN": (aws["roles"]["training"] + "-gone",
                              r"IAM role .*-gone does not exist\. Fix: deploy infra/iam.yaml"),
    }
    for key, (value, message) in cases.items():
        with pytest.raises(DataError, match=message):
            run_like_airflow(training_job("train_run", uri, _profile(aws, **{key: value})), _context("train_missing"))
    other_repo = IMAGE.replace(IMAGE_REPO, "recsys-nope")
    with pytest.raises(DataError, match="ECR repository recsys-nope does not exist"):
        run_like_airflow(training_job("train_run", uri, _profile(aws, TRAINING_IMAGE_URI=other_repo)),
                         _context("train_missing"))
    assert _training_jobs(aws) == before  # nothing was started


def test_the_training_image_runs_the_entry_point_sagemaker_is_given() -> None:
    """The training job's ContainerEntrypoint is the train image's venv python on the installed package (read from
    docker/train.Dockerfile: no Docker engine here), and that module is the remote entry point."""
    import re

    from pipeline.orchestration import remote
    from pipeline.orchestration.aws import TRAINING_ENTRY

    final = re.split(r"(?m)^FROM ", (Path(__file__).resolve().parents[3] / "docker" / "train.Dockerfile").read_text())[-1]
    assert re.search(r"ENV PATH=/opt/venv/bin:\$PATH", final) and "COPY --from=build /opt/venv /opt/venv" in final
    assert ["python", "-m", remote.__name__] == TRAINING_ENTRY and callable(remote.main)


def test_the_service_stops_a_job_before_the_task_times_out(aws: dict[str, Any]) -> None:
    """With an execution_timeout, the job's own limit ends first (so its reason, not a bare task timeout, is the
    failure, and no job outlives its task); without one the profile's limits apply."""
    import datetime as dt

    from pipeline.orchestration.aws import emr_serverless_job, training_job

    p = _profile(aws, EMR_TIMEOUT_MINUTES="600", TRAINING_MAX_RUNTIME_S="36000", POLL_SECONDS="60")
    assert emr_serverless_job("infer_run", "u", p).config["executionTimeoutMinutes"] == 600
    assert emr_serverless_job("infer_run", "u", p, execution_timeout=dt.timedelta(hours=2)).config[
        "executionTimeoutMinutes"] == 118
    sm = training_job("train_run", "u", p, execution_timeout=dt.timedelta(hours=6)).config["StoppingCondition"]
    assert sm == {"MaxRuntimeInSeconds": 6 * 3600 - 120}
    spot = _profile(aws, TRAINING_SPOT="true", TRAINING_MAX_RUNTIME_S="3600", POLL_SECONDS="60")
    sm = training_job("train_run", "u", spot, execution_timeout=dt.timedelta(hours=6)).config
    assert sm["EnableManagedSpotTraining"] and sm["StoppingCondition"] == {"MaxRuntimeInSeconds": 3600,
                                                                          "MaxWaitTimeInSeconds": 7200}


def _spark_defaults(overrides: dict[str, Any] | None) -> dict[str, str]:
    confs = [c for c in (overrides or {}).get("applicationConfiguration", []) if c["classification"] == "spark-defaults"]
    assert len(confs) <= 1, confs
    return confs[0]["properties"] if confs else {}


def test_emr_jobs_run_on_the_custom_image_s_python(aws: dict[str, Any]) -> None:
    """docker/spark.Dockerfile puts the project in a venv: the job run's spark-defaults point the driver and the
    executors' Python workers at it, and the default entry point is remote.py inside it. moto stores the request."""
    from moto.emrserverless.models import emrserverless_backends

    from pipeline.errors import DataError
    from pipeline.orchestration.aws import AwsProfile, emr_serverless_job
    from pipeline.orchestration.aws.profile import IMAGE_ENTRY_POINT, IMAGE_PYTHON

    env = _env(aws)
    del env["RECSYS_AWS_EMR_ENTRY_POINT"]
    profile = AwsProfile.from_env(env)
    assert profile.emr_entry_point == IMAGE_ENTRY_POINT and profile.emr_python == IMAGE_PYTHON
    docker = (Path(__file__).resolve().parents[3] / "docker" / "spark.Dockerfile").read_text()
    assert f"python3.11 -m venv {IMAGE_PYTHON.removesuffix('/bin/python')}" in docker  # where the image installs it
    venv = IMAGE_PYTHON.removesuffix("/bin/python")
    assert f"local://{venv}/lib/python3.11/site-packages/pipeline/orchestration/remote.py" == IMAGE_ENTRY_POINT
    op = emr_serverless_job("infer_run", _stage_any(aws, "python"), profile)
    job_id = run_like_airflow(op, _context("infer_run"))
    (run,) = [r for r in emrserverless_backends[ACCOUNT][REGION].job_runs[aws["app"]] if r.id == job_id]
    conf = _spark_defaults(run.configuration_overrides)
    assert {k: conf[k] for k in conf if "PYSPARK" in k} == {
        "spark.emr-serverless.driverEnv.PYSPARK_PYTHON": IMAGE_PYTHON,
        "spark.emr-serverless.driverEnv.PYSPARK_DRIVER_PYTHON": IMAGE_PYTHON, "spark.executorEnv.PYSPARK_PYTHON": IMAGE_PYTHON}
    assert run.job_driver["sparkSubmit"]["entryPoint"] == IMAGE_ENTRY_POINT
    # unset (empty): the release's own python3, and no PYSPARK_* at all
    bare = emr_serverless_job("infer_run", "s3://b/e.json", _profile(aws, EMR_PYTHON=""))
    assert not any("PYSPARK" in k for k in _spark_defaults(bare.configuration_overrides))
    for bad in ("python3", "/opt/recsys/bin/python --version", "../bin/python"):
        with pytest.raises(DataError, match=r"RECSYS_AWS_EMR_PYTHON is not valid: .* absolute path"):
            _profile(aws, EMR_PYTHON=bad)


# -- MLflow credentials: the secret's ARN goes to the jobs that use MLflow, never its value --------------------------

def test_the_jobs_that_use_mlflow_get_the_secret_arn_and_the_build_never(aws: dict[str, Any]) -> None:
    """Training: the SageMaker job's Environment; inference: the EMR Serverless driver's environment (spark-defaults
    spark.emr-serverless.driverEnv.*: only the driver talks to MLflow, the executors get the model's bytes); the
    matrix build: nothing. Without the setting nobody gets anything. The EMR job runs are started on moto, which
    stores what each was given (its job runs succeed at once: nothing runs in them)."""
    from moto.emrserverless.models import emrserverless_backends

    from pipeline.orchestration.aws import emr_serverless_job, mlflow_secret_passed, training_job
    from pipeline.orchestration.remote import MLFLOW_SECRET_ENV

    uri = _stage_any(aws, "mlflow-secret")
    driver_env = f"spark.emr-serverless.driverEnv.{MLFLOW_SECRET_ENV}"
    with_secret, without = _profile(aws, MLFLOW_SECRET_ARN=SECRET), _profile(aws)
    stored = {}
    for kind in ("build_matrix", "infer"):
        op = emr_serverless_job(f"{kind}_run", uri, with_secret)
        job_id = run_like_airflow(op, _context(f"{kind}_run", try_number=5))
        (run,) = [r for r in emrserverless_backends[ACCOUNT][REGION].job_runs[aws["app"]] if r.id == job_id]
        stored[kind] = run.configuration_overrides
        assert stored[kind]["monitoringConfiguration"]["s3MonitoringConfiguration"]["logUri"].endswith("/emr-logs/")
        assert mlflow_secret_passed(op) == (SECRET if kind == "infer" else None)
        plain = emr_serverless_job(f"{kind}_run", uri, without)
        assert driver_env not in _spark_defaults(plain.configuration_overrides) and mlflow_secret_passed(plain) is None
    assert driver_env not in _spark_defaults(stored["build_matrix"])
    assert _spark_defaults(stored["infer"])[driver_env] == SECRET
    sm = training_job("train_run", uri, with_secret)
    assert sm.config["Environment"] == {"PYTHONUNBUFFERED": "1", MLFLOW_SECRET_ENV: SECRET} and mlflow_secret_passed(sm) == SECRET
    plain_sm = training_job("train_run", uri, without)
    assert plain_sm.config["Environment"] == {"PYTHONUNBUFFERED": "1"} and mlflow_secret_passed(plain_sm) is None
