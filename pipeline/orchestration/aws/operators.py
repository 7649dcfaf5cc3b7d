"""The `aws` execution profile: EMR Serverless runs the Spark jobs, a SageMaker training job trains on a GPU.

Each remote step is three tasks: a prepare task stages the job's envelope (pipeline.orchestration.remote.stage),
an operator built here runs `pipeline/orchestration/remote.py` on that envelope's URI and waits for it deferred
(the Amazon provider's triggers poll from the triggerer, no worker slot is held), and a collect task reads the
typed result back (`remote.collect`). The operators are the provider's, subclassed only to

- name each remote job from (dag, run, task, map index, try): unique per try, the same when a try is resumed,
  so a resumed try attaches to its job instead of starting a second one (`remote_job_name`, `client_token`);
- check the role and the training image before anything is started (a missing one is one line naming the fix);
- fail with the remote job's own one-line message (its outcome next to the envelope) instead of the provider's
  generic "job failed".

Training goes to a **SageMaker training job**, not AWS Batch (see `training_job`). What the tasks do on AWS
(`REQUIRED_ACTIONS`, next to the operators that do it) is what infra/iam.yaml must grant and nothing more:
tests/infra/test_iam_derived.py checks both directions.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any, Literal, NoReturn

from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
from airflow.providers.amazon.aws.hooks.emr import EmrServerlessHook
from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook
from airflow.providers.amazon.aws.operators.emr import EmrServerlessStartJobOperator
from airflow.providers.amazon.aws.operators.sagemaker import SageMakerTrainingOperator
from airflow.providers.amazon.aws.triggers.emr import EmrServerlessStartApplicationTrigger, EmrServerlessStartJobTrigger
from airflow.providers.amazon.aws.triggers.sagemaker import SageMakerTrigger
from botocore.exceptions import ClientError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import DataError
from pipeline.io.lake import resolve
from pipeline.orchestration.remote import ENVELOPE, OUTCOME, RemoteJobFailed, collect

# -- configuration -------------------------------------------------------------------------------------------

ENV_PREFIX = "RECSYS_AWS_"
_ROLE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]{1,512}$")
_S3_URI = re.compile(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\s?#]*)?$")
# an ECR image pinned by tag or digest (the repositories are tag-immutable; `latest` would move under a retry)
_ECR_IMAGE = re.compile(r"^(?P<account>\d{12})\.dkr\.ecr\.(?P<region>[a-z0-9-]+)\.amazonaws\.com(\.cn)?/"
                        r"(?P<repo>[a-z0-9][a-z0-9._/-]{1,254})(:(?P<tag>[\w][\w.-]{0,127})|@(?P<digest>sha256:[0-9a-f]{64}))$")
_REGION = re.compile(r"^[a-z]{2}(-gov|-iso[a-z]?)?-[a-z]+-\d$")
# SageMaker GPU training instance families (the image is a CUDA build; a CPU instance would train on the CPU)
_GPU_INSTANCE = re.compile(r"^ml\.(g4dn|g5|g6|g6e|gr6|p3|p3dn|p4d|p4de|p5|p5e|p5en)\.[0-9a-z]+$")


class AwsProfile(BaseModel):
    """Where the `aws` profile runs the remote steps; one RECSYS_AWS_<FIELD> variable per field (`from_env`).

    The values come from the stacks in infra/ (docs/runbook.md, "Running on AWS"): the compute stack's
    SparkApplicationId, the iam stack's role ARNs, the ECR repositories' images.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    region: str = Field(description="the AWS region of the stacks")
    project: str = Field("recsys", pattern=r"^[a-z][a-z0-9-]{1,20}$",
                         description="the stacks' Project: job name prefix and `project` tag (IAM scopes both)")
    aws_conn_id: str | None = Field("aws_default", description="the operators' Airflow connection (None: boto3's chain)")
    # EMR Serverless (build_matrix, infer)
    emr_application_id: str = Field(pattern=r"^[0-9a-z]{1,64}$", description="compute stack output SparkApplicationId")
    emr_build_role_arn: str = Field(description="iam stack output SparkBuildRoleArn (the matrix build's job role)")
    emr_infer_role_arn: str = Field(description="iam stack output InferenceRoleArn (the Spark inference's job role)")
    emr_entry_point: str = Field(description="remote.py where EMR Serverless reads it: local:///... in the custom "
                                             "image (docker/spark.Dockerfile) or s3://.../remote.py")
    spark_submit_parameters: str = Field("", description="extra spark-submit parameters (--conf k=v ...)")
    emr_log_uri: str | None = Field(None, description="s3:// prefix for the job runs' driver/executor logs")
    emr_timeout_minutes: int = Field(240, ge=5, le=7 * 24 * 60, description="a job run is cancelled after this")
    # SageMaker (train)
    training_role_arn: str = Field(description="iam stack output TrainingRoleArn")
    training_image_uri: str = Field(description="the docker/train.Dockerfile image in ECR, by tag or digest")
    training_instance_type: str = Field("ml.g5.xlarge", description="a GPU training instance type")
    training_instance_count: int = Field(1, description="1: remote.py runs one TrainJob process per job")
    training_volume_gb: int = Field(50, ge=1, le=16384)
    training_max_runtime_s: int = Field(6 * 3600, ge=60, le=28 * 24 * 3600, description="SageMaker stops the job after this")
    training_spot: bool = Field(False, description="managed spot instances (cheaper; may wait up to the max runtime again)")
    training_output_uri: str = Field(description="s3:// prefix for SageMaker's own output (s3://<ArtifactsBucket>/sagemaker-output)")
    # waiting and logs
    poll_seconds: int = Field(60, ge=1, le=3600, description="how often the triggers poll a job's state")
    print_log: bool = Field(True, description="tail the training job's CloudWatch log into the task log")
    preflight: bool = Field(True, description="check the job roles and the training image exist before starting a job")

    @field_validator("region")
    @classmethod
    def _region(cls, v: str) -> str:
        if not _REGION.match(v):
            raise ValueError(f"{v!r} is not an AWS region name (like us-east-1)")
        return v

    @field_validator("emr_build_role_arn", "emr_infer_role_arn", "training_role_arn")
    @classmethod
    def _role(cls, v: str) -> str:
        if not _ROLE_ARN.match(v):
            raise ValueError(f"{v!r} is not an IAM role ARN (arn:aws:iam::<12-digit account>:role/<name>)")
        return v

    @field_validator("emr_log_uri", "training_output_uri")
    @classmethod
    def _s3(cls, v: str | None) -> str | None:
        if v is not None and not _S3_URI.match(v):
            raise ValueError(f"{v!r} is not an s3://bucket/prefix URI")
        return v.rstrip("/") if v else v

    @field_validator("emr_entry_point")
    @classmethod
    def _entry(cls, v: str) -> str:
        if not (v.endswith(".py") and (_S3_URI.match(v) or re.match(r"^local:///[^\s?#]+$", v))):
            raise ValueError(f"{v!r} is not remote.py's location (s3://bucket/key.py, or local:///path.py in the image)")
        return v

    @field_validator("spark_submit_parameters")
    @classmethod
    def _params(cls, v: str) -> str:
        if "\n" in v or "\r" in v:
            raise ValueError("spark-submit parameters must be one line")
        return v.strip()

    @field_validator("training_image_uri")
    @classmethod
    def _image(cls, v: str) -> str:
        m = _ECR_IMAGE.match(v)
        if not m:
            raise ValueError(f"{v!r} is not an ECR image pinned by tag or digest "
                             "(<account>.dkr.ecr.<region>.amazonaws.com/<repository>:<tag>)")
        if m["tag"] == "latest":
            raise ValueError(f"{v!r} uses the tag 'latest': pin the image by its git-sha tag or digest")
        return v

    @field_validator("training_instance_type")
    @classmethod
    def _gpu(cls, v: str) -> str:
        if not _GPU_INSTANCE.match(v):
            raise ValueError(f"{v!r} is not a SageMaker GPU training instance type (like ml.g5.xlarge)")
        return v

    @field_validator("training_instance_count")
    @classmethod
    def _one(cls, v: int) -> int:
        if v != 1:  # several instances would each run the whole TrainJob: multi-node DDP is the spark profile's
            raise ValueError(f"{v} instances: a training job runs one TrainJob process, use 1 (a larger GPU instance "
                             "type trains faster)")
        return v

    @model_validator(mode="after")
    def _same_region(self) -> AwsProfile:
        m = _ECR_IMAGE.match(self.training_image_uri)
        if m and m["region"] != self.region:
            raise ValueError(f"the training image is in {m['region']}, the profile in {self.region}: "
                             "SageMaker pulls from the job's own region")
        return self

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> AwsProfile:
        """The profile from RECSYS_AWS_<FIELD> variables; a missing or bad one is one DataError naming the variable."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is not None:
                values[name] = None if (name in ("aws_conn_id", "emr_log_uri") and raw == "") else raw
        try:
            return cls.model_validate(values)
        except ValidationError as e:
            first = e.errors()[0]
            loc = first.get("loc") or ()
            var = f"{ENV_PREFIX}{str(loc[0]).upper()}" if loc else f"{ENV_PREFIX}*"
            msg = str(first["msg"]).removeprefix("Value error, ")
            raise DataError(f"{var} is not valid: {msg}",
                            f"set {var} (docs/runbook.md, 'Running on AWS', lists the settings and where each comes from)"
                            ) from None


# -- names: unique per try, stable within one -----------------------------------------------------------------

def _map_index(ti: Any) -> int:
    m = getattr(ti, "map_index", -1)
    return -1 if m is None else int(m)


def _key(context: Mapping[str, Any]) -> tuple[str, str, str, int, int]:
    ti = context["ti"]
    return (str(ti.dag_id), str(context["run_id"]), str(ti.task_id), _map_index(ti),
            int(ti.try_number))


def remote_job_name(project: str, dag_id: str, run_id: str, task_id: str, map_index: int, try_number: int) -> str:
    """A job name for one try of one task instance: `<project>-<task>-<hash of dag, run, task, map index>-t<try>`.

    At most 63 characters of [a-zA-Z0-9-] (SageMaker's rule; EMR Serverless accepts it too). The same try gets the
    same name (a resumed try finds its job), the next try a new one (a retry never collides with the failed job)."""
    digest = hashlib.sha256(f"{dag_id}\n{run_id}\n{task_id}\n{map_index}".encode()).hexdigest()[:12]
    tail = f"-{digest}-t{try_number}"
    slug = re.sub(r"[^a-zA-Z0-9]+", "-", f"{project}-{task_id}").strip("-")
    return f"{slug[: 63 - len(tail)].rstrip('-')}{tail}"


def client_token(dag_id: str, run_id: str, task_id: str, map_index: int, try_number: int) -> str:
    """EMR Serverless's idempotency token for one try: StartJobRun with the same token returns the same job run."""
    return hashlib.sha256(f"{dag_id}\n{run_id}\n{task_id}\n{map_index}\n{try_number}".encode()).hexdigest()[:64]


# -- errors: one line, the cause and the fix --------------------------------------------------------------------

def _one_line(text: str) -> str:
    return " ".join(str(text).split())


_FIX_BY_CODE = {
    "AccessDeniedException": "give the Airflow role that action on that resource (infra/iam.yaml AirflowExecutionRole; "
                             "tests/infra/test_iam_derived.py lists what each task needs)",
    "AccessDenied": "give the Airflow role that action on that resource (infra/iam.yaml AirflowExecutionRole)",
    "ResourceNotFoundException": "check RECSYS_AWS_EMR_APPLICATION_ID against the compute stack's SparkApplicationId "
                                 "output (and RECSYS_AWS_REGION)",
    "ValidationException": "correct the RECSYS_AWS_* setting the message names, then clear the task",
    "ThrottlingException": "clear the task to retry later",
    "ResourceLimitExceeded": "raise the account's SageMaker quota for that instance type, or choose another "
                             "(RECSYS_AWS_TRAINING_INSTANCE_TYPE)",
}


@contextlib.contextmanager
def _aws_errors(doing: str) -> Iterator[None]:
    """An AWS API error while `doing` becomes one DataError line: the service's code and message, and a fix."""
    try:
        yield
    except ClientError as e:
        err = e.response.get("Error", {})
        code = str(err.get("Code", "Error"))
        fix = _FIX_BY_CODE.get(code, "read the AWS error, correct the setting or permission it names, then clear the task")
        raise DataError(f"{doing} failed: {code}: {_one_line(err.get('Message', e))}", fix) from None


def _remote_failure(envelope_uri: str, service_line: str) -> NoReturn:
    """Raise RemoteJobFailed for a remote job the engine reports as not successful: the remote job's own one-line
    message (its outcome next to the envelope) when it wrote one, else the engine's reason and collect's hint."""
    service_line = _one_line(service_line)
    try:
        has_outcome = envelope_uri.endswith("/" + ENVELOPE) and resolve(envelope_uri[: -len(ENVELOPE)] + OUTCOME).exists()
        collect(envelope_uri)
    except RemoteJobFailed as e:
        msg = f"{e} [{service_line}]" if has_outcome else f"{service_line}; {e}"
        raise RemoteJobFailed(_one_line(msg)) from None
    except Exception as e:  # the outcome could not be read (S3 down, denied): the engine's reason still names the job
        raise RemoteJobFailed(_one_line(f"{service_line} (its outcome could not be read: {e})")) from None
    raise RemoteJobFailed(f"{service_line}, though its outcome says it succeeded: clear the task to run it again")


def _preflight_role(aws_conn_id: str | None, region: str, role_arn: str, setting: str) -> None:
    """The role exists (iam:GetRole): a missing role would otherwise fail inside the service, minutes later."""
    iam = AwsBaseHook(aws_conn_id=aws_conn_id, client_type="iam", region_name=region).conn
    name = role_arn.rsplit("/", 1)[-1]
    try:
        iam.get_role(RoleName=name)
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("NoSuchEntity", "NoSuchEntityException"):
            raise DataError(f"IAM role {role_arn} does not exist",
                            f"deploy infra/iam.yaml, or set {setting} to its output ARN") from None
        with _aws_errors(f"checking IAM role {role_arn}"):
            raise


def _preflight_image(aws_conn_id: str | None, region: str, image_uri: str) -> None:
    """The training image is in ECR (ecr:DescribeImages): SageMaker would only find out after provisioning a GPU."""
    m = _ECR_IMAGE.match(image_uri)
    assert m, image_uri  # validated by AwsProfile
    ecr = AwsBaseHook(aws_conn_id=aws_conn_id, client_type="ecr", region_name=region).conn
    image_id = {"imageTag": m["tag"]} if m["tag"] else {"imageDigest": m["digest"]}
    fix = ("build docker/train.Dockerfile and push it with that tag (docs/runbook.md §1), "
           "or set RECSYS_AWS_TRAINING_IMAGE_URI to a pushed image")
    try:
        ecr.describe_images(registryId=m["account"], repositoryName=m["repo"], imageIds=[image_id])
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code")
        if code == "RepositoryNotFoundException":
            raise DataError(f"training image {image_uri}: ECR repository {m['repo']} does not exist",
                            "deploy infra/compute.yaml (it creates <project>-train), then " + fix) from None
        if code == "ImageNotFoundException":
            raise DataError(f"training image {image_uri} is not in ECR", fix) from None
        with _aws_errors(f"checking training image {image_uri}"):
            raise


# -- the triggers' polling without aiobotocore -------------------------------------------------------------------
#
# The provider's triggers poll through aiobotocore, and no aiobotocore release accepts the botocore this project
# pins (aiobotocore 3.10 wants botocore < 1.43.118; the lock has 1.44.5). So the operators below defer to the
# provider's own triggers with one change: their hook's async client is the synchronous boto3 client, and each
# single poll of the provider's waiter runs in a thread (`asyncio.to_thread`), so the triggerer's event loop never
# blocks and a cancelled trigger leaves at most one request in flight. The waiting logic (attempts, delays, terminal
# states, the EMR trigger's cancel-on-kill) is the provider's, unchanged.

class _SyncClientAsAsync:
    """`async with await hook.get_async_conn() as client` yielding the synchronous client."""

    def __init__(self, client: Any) -> None:
        self.client = client

    async def __aenter__(self) -> Any:
        return self.client

    async def __aexit__(self, *exc: object) -> None:
        return None


class _ThreadedWaiter:
    """A botocore waiter whose `wait` is awaitable: one poll (MaxAttempts 1, as the provider asks) in a thread."""

    def __init__(self, waiter: Any) -> None:
        self.waiter = waiter

    async def wait(self, **kwargs: Any) -> None:
        await asyncio.to_thread(self.waiter.wait, **kwargs)


class _ThreadedPolling:
    async def get_async_conn(self) -> Any:
        return _SyncClientAsAsync(await asyncio.to_thread(lambda: self.conn))  # type: ignore[attr-defined]

    def get_waiter(self, waiter_name: str, parameters: dict[str, str] | None = None,
                   config_overrides: dict[str, Any] | None = None, deferrable: bool = False, client: Any = None) -> Any:
        waiter = super().get_waiter(waiter_name, parameters, config_overrides)  # type: ignore[misc]
        return _ThreadedWaiter(waiter) if deferrable else waiter


class ThreadedEmrServerlessHook(_ThreadedPolling, EmrServerlessHook):
    pass


class ThreadedSageMakerHook(_ThreadedPolling, SageMakerHook):
    pass


class EmrServerlessJobTrigger(EmrServerlessStartJobTrigger):
    aws_hook_class = ThreadedEmrServerlessHook


class EmrServerlessApplicationTrigger(EmrServerlessStartApplicationTrigger):
    aws_hook_class = ThreadedEmrServerlessHook


class SageMakerJobTrigger(SageMakerTrigger):
    def hook(self) -> ThreadedSageMakerHook:
        return ThreadedSageMakerHook(aws_conn_id=self.aws_conn_id, region_name=self.region_name, verify=self.verify,
                                     config=self.botocore_config)


_THREADED: dict[type, type] = {EmrServerlessStartJobTrigger: EmrServerlessJobTrigger,
             EmrServerlessStartApplicationTrigger: EmrServerlessApplicationTrigger, SageMakerTrigger: SageMakerJobTrigger}


def _threaded(trigger: Any) -> Any:
    """The same trigger (its serialized arguments) polling through `_ThreadedPolling`."""
    cls = _THREADED.get(type(trigger))
    return trigger if cls is None else cls(**trigger.serialize()[1])


class _DeferThreaded:
    def defer(self, *, trigger: Any, method_name: str, kwargs: dict[str, Any] | None = None, timeout: Any = None) -> NoReturn:
        super().defer(trigger=_threaded(trigger), method_name=method_name, kwargs=kwargs, timeout=timeout)  # type: ignore[misc]
        raise AssertionError("defer() returned")  # pragma: no cover


# -- EMR Serverless: the Spark jobs --------------------------------------------------------------------------

SparkKind = Literal["build_matrix", "infer"]


class RemoteEmrServerlessJobOperator(_DeferThreaded, EmrServerlessStartJobOperator):
    """EmrServerlessStartJobOperator for one staged envelope: per-try name and idempotency token, a role check
    first, and on failure the remote job's own message (the provider raises a generic one and cancels)."""

    template_fields = (*EmrServerlessStartJobOperator.template_fields, "envelope_uri")

    def __init__(self, *, envelope_uri: Any, kind: SparkKind, project: str, preflight: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.envelope_uri = envelope_uri
        self.kind = kind
        self.project = project
        self.preflight = preflight

    def execute(self, context: Any, event: dict[str, Any] | None = None) -> str | None:
        dag_id, run_id, task_id, map_index, try_number = _key(context)
        self.name = remote_job_name(self.project, dag_id, run_id, task_id, map_index, try_number)
        self.client_request_token = client_token(dag_id, run_id, task_id, map_index, try_number)
        if event is None and self.preflight:
            _preflight_role(self.aws_conn_id, str(self.region_name), self.execution_role_arn, "RECSYS_AWS_EMR_*_ROLE_ARN")
        with _aws_errors(f"EMR Serverless job {self.name} on application {self.application_id}"):
            return super().execute(context, event)

    def defer(self, *, trigger: Any, method_name: str, kwargs: dict[str, Any] | None = None, timeout: Any = None) -> NoReturn:
        # the task resumes on a fresh operator, and the trigger's failure event names no job: hand the id over
        kwargs = {**(kwargs or {}), "job_id": self.job_id} if method_name == "execute_complete" else kwargs
        super().defer(trigger=trigger, method_name=method_name, kwargs=kwargs, timeout=timeout)

    def execute_complete(self, context: Any, event: dict[str, Any] | None = None,  # type: ignore[override]
                         job_id: str | None = None) -> str | None:
        event = event or {}
        details = event.get("job_details") or {}
        job_id = details.get("job_id") or job_id or self.job_id
        if event.get("status") == "success":
            self.log.info("EMR Serverless job run %s succeeded", job_id)
            return str(job_id)
        with _aws_errors(f"reading EMR Serverless job run {job_id}"):
            run = self.hook.conn.get_job_run(applicationId=self.application_id, jobRunId=job_id)["jobRun"]
        state = run.get("state", "?")
        if state not in self.hook.JOB_TERMINAL_STATES:  # the wait timed out: do not leave it running (and billing)
            with contextlib.suppress(ClientError):
                self.hook.conn.cancel_job_run(applicationId=self.application_id, jobRunId=job_id)
            state = f"{state}, cancelled after the wait timed out ({event.get('message', '')})"
        _remote_failure(str(self.envelope_uri),
                        f"EMR Serverless job run {job_id} ({run.get('name', self.name)}) {state}: {run.get('stateDetails', '')}")


def _service_limit_s(wanted_s: int, poll_s: int, kwargs: Mapping[str, Any]) -> int:
    """The service-side time limit: the profile's, but ending before the task's execution_timeout (when given), so
    the service stops the job itself and the task fails with its reason rather than leave a job nobody waits for."""
    timeout = kwargs.get("execution_timeout")
    if timeout is None:
        return wanted_s
    budget = int(timeout.total_seconds()) - max(2 * poll_s, 60)
    return max(min(wanted_s, budget), 300)


def emr_serverless_job(task_id: str, envelope_uri: Any, profile: AwsProfile, kind: SparkKind | None = None,
                       **kwargs: Any) -> RemoteEmrServerlessJobOperator:
    """The task that runs remote.py on `envelope_uri` (the prepare task's XComArg or a template) as an EMR
    Serverless job run under `kind`'s role (build_matrix: the spark-build role, infer: the inference role),
    deferred until it ends. `kind` None: read from the task id's start. `kwargs` go to BaseOperator."""
    if kind is None:
        kind = "build_matrix" if task_id.startswith("build_matrix") else "infer" if task_id.startswith("infer") else None
        if kind is None:
            raise ValueError(f"emr_serverless_job({task_id!r}): pass kind='build_matrix' or kind='infer'")
    role = profile.emr_build_role_arn if kind == "build_matrix" else profile.emr_infer_role_arn
    submit: dict[str, Any] = {"entryPoint": profile.emr_entry_point, "entryPointArguments": [envelope_uri]}
    if profile.spark_submit_parameters:
        submit["sparkSubmitParameters"] = profile.spark_submit_parameters
    overrides = ({"monitoringConfiguration": {"s3MonitoringConfiguration": {"logUri": profile.emr_log_uri + "/"}}}
                 if profile.emr_log_uri else None)
    poll = profile.poll_seconds
    minutes = _service_limit_s(profile.emr_timeout_minutes * 60, poll, kwargs) // 60
    return RemoteEmrServerlessJobOperator(
        task_id=task_id, envelope_uri=envelope_uri, kind=kind, project=profile.project, preflight=profile.preflight,
        application_id=profile.emr_application_id, execution_role_arn=role,
        job_driver={"sparkSubmit": submit}, configuration_overrides=overrides,
        # tags: the Airflow role may only act on job runs tagged with the project (infra/iam.yaml SparkJobs)
        config={"tags": {"project": profile.project}, "executionTimeoutMinutes": minutes},
        wait_for_completion=True, deferrable=True, waiter_delay=poll,
        waiter_max_attempts=math.ceil(minutes * 60 / poll) + 2,
        aws_conn_id=profile.aws_conn_id, region_name=profile.region, **kwargs)


# -- SageMaker: GPU training ----------------------------------------------------------------------------------

TRAINING_ENTRY = ["python", "-m", "pipeline.orchestration.remote"]  # docker/train.Dockerfile puts its venv on PATH


class RemoteSageMakerTrainingOperator(_DeferThreaded, SageMakerTrainingOperator):
    """SageMakerTrainingOperator for one staged envelope: the per-try job name (a resumed try attaches to its job),
    role and image checked first, and on failure the remote job's own message."""

    template_fields = (*SageMakerTrainingOperator.template_fields, "envelope_uri")

    def __init__(self, *, envelope_uri: Any, project: str, preflight: bool = True, image_uri: str = "",
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.envelope_uri = envelope_uri
        self.project = project
        self.preflight = preflight
        self.image_uri = image_uri

    def execute(self, context: Any) -> dict:
        name = remote_job_name(self.project, *_key(context))
        self.config["TrainingJobName"] = name
        region = str(self.region_name)
        if self.preflight:
            _preflight_role(self.aws_conn_id, region, self.config["RoleArn"], "RECSYS_AWS_TRAINING_ROLE_ARN")
            _preflight_image(self.aws_conn_id, region, self.image_uri)
        with _aws_errors(f"SageMaker training job {name}"):
            if self._check_if_job_exists(name, self.hook.describe_training_job):
                # this try already started it (the worker was lost before it deferred): wait for that one
                self.log.info("training job %s exists already: waiting for it instead of starting another", name)
                self.defer(trigger=SageMakerTrigger(job_name=name, job_type="Training", waiter_delay=self.check_interval,
                                                    waiter_max_attempts=self.max_attempts, aws_conn_id=self.aws_conn_id,
                                                    region_name=self.region_name, verify=self.verify,
                                                    botocore_config=self.botocore_config),
                           method_name="execute_complete")
            try:
                return super().execute(context)
            except Exception as e:
                if "SageMaker job failed because" not in str(e):  # the job failed before the operator deferred
                    raise
                _remote_failure(str(self.envelope_uri), f"SageMaker training job {name} Failed: "
                                f"{str(e).split('SageMaker job failed because', 1)[1]}")

    def execute_complete(self, context: Any, event: dict[str, Any] | None = None) -> dict[str, dict]:
        event = event or {}
        name = str(event.get("job_name") or remote_job_name(self.project, *_key(context)))
        status = event.get("status")
        if status == "success":
            with _aws_errors(f"reading SageMaker training job {name}"):
                return self.serialize_result(name)
        state = {"failed": "Failed", "stopped": "Stopped"}.get(str(status), f"{status}")
        if status == "timeout":  # the wait gave up: stop the job rather than pay for a GPU nobody waits for
            with contextlib.suppress(ClientError):
                self.hook.get_conn().stop_training_job(TrainingJobName=name)
            state = "still running when the wait timed out, stopped"
        _remote_failure(str(self.envelope_uri), f"SageMaker training job {name} {state}: {event.get('message', '')}")


def training_job(task_id: str, envelope_uri: Any, profile: AwsProfile, **kwargs: Any) -> RemoteSageMakerTrainingOperator:
    """The task that runs `python -m pipeline.orchestration.remote <envelope_uri>` in the training image on a GPU
    instance as a SageMaker training job, deferred until it ends. `kwargs` go to BaseOperator.

    Why SageMaker and not AWS Batch:
    - no standing compute: Batch needs a compute environment (GPU ECS AMI, launch template, instance role, VPC),
      a job queue and a job definition in infra/; SageMaker needs only the training role that infra/iam.yaml has;
    - cost: both bill the instance's seconds; SageMaker adds a premium over EC2 (about 15-20% on ml.g5), Batch adds
      nothing but keeps the environment to maintain. A weekly job of a few GPU-hours makes the premium small;
    - spot: SageMaker's managed spot (`training_spot`) is one flag with MaxWaitTimeInSeconds; Batch's spot needs a
      second compute environment and retry strategy;
    - GPU images: SageMaker's hosts carry the NVIDIA driver and run our CUDA image (docker/train.Dockerfile) as
      is; Batch needs the GPU-optimised ECS AMI to match the image's CUDA;
    - the envelope: SageMaker passes ContainerEntrypoint + ContainerArguments (here `python -m
      pipeline.orchestration.remote <uri>`), Batch a containerOverrides command: equally simple. A failed
      container's /opt/ml/output/failure becomes the job's FailureReason (remote.py writes its one line there);
    - the deferrable SageMakerTrainingOperator tails the job's CloudWatch log into the task log.
    """
    spec: dict[str, Any] = {"TrainingImage": profile.training_image_uri, "TrainingInputMode": "File",
                            "ContainerEntrypoint": TRAINING_ENTRY, "ContainerArguments": [envelope_uri]}
    poll = profile.poll_seconds
    wait_s = 2 * profile.training_max_runtime_s if profile.training_spot else profile.training_max_runtime_s
    limit = _service_limit_s(wait_s, poll, kwargs)  # spot: waiting for capacity counts too
    stopping: dict[str, Any] = {"MaxRuntimeInSeconds": min(profile.training_max_runtime_s, limit)}
    config: dict[str, Any] = {
        "TrainingJobName": "set-per-try-at-execute",
        "AlgorithmSpecification": spec,
        "RoleArn": profile.training_role_arn,
        "OutputDataConfig": {"S3OutputPath": profile.training_output_uri + "/"},
        "ResourceConfig": {"InstanceType": profile.training_instance_type, "InstanceCount": profile.training_instance_count,
                           "VolumeSizeInGB": profile.training_volume_gb},
        "StoppingCondition": stopping,
        "Environment": {"PYTHONUNBUFFERED": "1"},
        "Tags": [{"Key": "project", "Value": profile.project}],
    }
    if profile.training_spot:
        config["EnableManagedSpotTraining"] = True
        stopping["MaxWaitTimeInSeconds"] = limit
    return RemoteSageMakerTrainingOperator(
        task_id=task_id, envelope_uri=envelope_uri, project=profile.project, preflight=profile.preflight,
        image_uri=profile.training_image_uri, config=config, wait_for_completion=True, deferrable=True,
        check_if_job_exists=False,  # execute() checks its per-try name itself and attaches instead of renaming
        print_log=profile.print_log, check_interval=poll,
        max_attempts=math.ceil(limit / poll) + 5,
        aws_conn_id=profile.aws_conn_id, region_name=profile.region, **kwargs)


# -- what the tasks do on AWS: the IAM policies derive from this (tests/infra/test_iam_derived.py) -------------
#
# Resources are written as in infra/iam.yaml's !Sub strings (same ${...} names), so the test resolves both alike.
# `s3:ListBucket` is a bucket ARN plus `#<prefix>`: the policy's s3:prefix condition. A leading `!` is NotResource.

Role = Literal["airflow", "spark-build", "inference", "training"]
Need = tuple[str, str]  # (action, resource)

_ARN = "arn:${AWS::Partition}"
_LOGS = f"{_ARN}:logs:${{AWS::Region}}:${{AWS::AccountId}}:log-group:"
AREAS: dict[str, tuple[str, str]] = {  # lake area -> (bucket, key prefix)
    "events": ("${DataLakeBucket}", "events"),
    "snapshots": ("${DataLakeBucket}", "snapshots"),
    "staging": ("${DataLakeBucket}", "_jobs"),  # RECSYS_STAGING_URI's default: <lake>/_jobs (envelopes, outcomes)
    "recommendations": ("${RecommendationsBucket}", "recommendations"),
    "mlflow": ("${ArtifactsBucket}", "mlflow"),
    "ledger": ("${ArtifactsBucket}", "ledger"),
    "emr_logs": ("${ArtifactsBucket}", "emr-logs"),
    "sagemaker_output": ("${ArtifactsBucket}", "sagemaker-output"),
}
# L list the prefix, R read, W write, M abort a multipart write, D delete
_S3_ACTIONS = {"L": "s3:ListBucket", "R": "s3:GetObject", "W": "s3:PutObject", "M": "s3:AbortMultipartUpload",
               "D": "s3:DeleteObject"}

# What each job does to the lake, from its code. It runs remotely under its job role (JOB_ROLE), and every remote
# job reads its envelope and replaces its outcome in the staging area (remote.execute).
_STAGED = {"staging": "LRWMD"}
JOB_DATA: dict[str, dict[str, str]] = {
    "build_matrix": {"events": "LR", "snapshots": "LRWMD", **_STAGED},  # D: a failed build removes its temporary run
    "train": {"snapshots": "LR", "mlflow": "LRWM", **_STAGED},
    "infer": {"events": "LR", "mlflow": "LR", "recommendations": "LRWMD", **_STAGED},  # D: a re-run replaces its date
}
JOB_ROLE: dict[str, Role] = {"build_matrix": "spark-build", "infer": "inference", "train": "training"}

# The DAGs' Python tasks (they run on the Airflow worker, as the Airflow role) and what they do to the lake.
# A task id missing here fails tests/infra/test_iam_derived.py: declare what a new task does, then grant it.
TASK_DATA: dict[str, dict[str, str]] = {
    "build_matrix_stage": _STAGED, "train_stage": _STAGED, "infer_stage": _STAGED,  # remote.stage
    "build_matrix": {"staging": "LR"}, "train": {"staging": "LR"}, "infer": {"staging": "LR"},  # remote.collect
    # the gate scores candidate, champion and baselines on the snapshot's test users and keeps the ledger
    "gate_and_promote": {"snapshots": "LR", "mlflow": "LR", "ledger": "LRW"},
    "champion_exists": {}, "champion_moved": {},  # the MLflow registry (HTTP) only; nothing on S3
}

_EMR_APPS = f"{_ARN}:emr-serverless:${{AWS::Region}}:${{AWS::AccountId}}:/applications/*"
_TRAINING_JOBS = f"{_ARN}:sagemaker:${{AWS::Region}}:${{AWS::AccountId}}:training-job/${{Project}}-*"
_TRAIN_REPO = f"{_ARN}:ecr:${{AWS::Region}}:${{AWS::AccountId}}:repository/${{Project}}-train"
_SAGEMAKER_LOGS = f"{_LOGS}/aws/sagemaker/TrainingJobs:*"


def role_arn(role: Role) -> str:
    """A job role's ARN as infra/iam.yaml names it."""
    return f"{_ARN}:iam::${{AWS::AccountId}}:role/${{Project}}-${{Environment}}-{role}"


# The operators' own API calls (as the Airflow role), beside what their job does.
def _emr_operator_needs(kind: SparkKind) -> set[Need]:
    calls = {"emr-serverless:GetApplication", "emr-serverless:StartApplication",  # started if auto-stopped
             "emr-serverless:StartJobRun", "emr-serverless:TagResource",  # the job run's project tag
             "emr-serverless:GetJobRun",  # the trigger's polling, the failure's details
             "emr-serverless:CancelJobRun"}  # on kill, and when the wait times out
    role = role_arn(JOB_ROLE[kind])
    return {(a, _EMR_APPS) for a in calls} | {("iam:PassRole", role), ("iam:GetRole", role)}  # GetRole: preflight


def _sagemaker_operator_needs() -> set[Need]:
    calls = {"sagemaker:CreateTrainingJob", "sagemaker:AddTags",  # the job's project tag
             "sagemaker:DescribeTrainingJob",  # exists-check, the trigger's polling, the result
             "sagemaker:StopTrainingJob"}  # on kill, and when the wait times out
    role = role_arn("training")
    return ({(a, _TRAINING_JOBS) for a in calls}
            | {("iam:PassRole", role), ("iam:GetRole", role), ("ecr:DescribeImages", _TRAIN_REPO)}  # preflight
            | {("logs:DescribeLogStreams", _SAGEMAKER_LOGS), ("logs:GetLogEvents", _SAGEMAKER_LOGS)})  # print_log


# What the services themselves do with a role, whatever the job: documented by AWS for each service.
SERVICE_NEEDS: dict[Role, set[Need]] = {
    "training": {  # SageMaker pulls the image, writes the job's log, metrics and its output with the job's role
        ("ecr:BatchGetImage", _TRAIN_REPO), ("ecr:GetDownloadUrlForLayer", _TRAIN_REPO),
        ("ecr:BatchCheckLayerAvailability", _TRAIN_REPO), ("ecr:GetAuthorizationToken", "*"),
        *((a, _SAGEMAKER_LOGS) for a in ("logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents",
                                        "logs:DescribeLogStreams")),
        ("cloudwatch:PutMetricData", "*"),
        *((_S3_ACTIONS[c], f"{_ARN}:s3:::${{ArtifactsBucket}}/sagemaker-output/*") for c in "WM"),
    },
    **{role: {  # EMR Serverless writes the driver/executor logs: S3 (the job's logUri) and the application's log group
        (_S3_ACTIONS["W"], f"{_ARN}:s3:::${{ArtifactsBucket}}/emr-logs/*"),
        *((a, f"{_LOGS}/${{Project}}/${{Environment}}/emr-serverless:*")
          for a in ("logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams")),
        ("logs:DescribeLogGroups", f"{_LOGS}*"),
    } for role in ("spark-build", "inference")},
    "airflow": {  # MWAA's own runtime (AWS's execution-role policy for MWAA): DAGs, its logs, metrics, Celery queue
        ("airflow:PublishMetrics", f"{_ARN}:airflow:${{AWS::Region}}:${{AWS::AccountId}}:environment/${{MwaaEnvironmentName}}"),
        *((a, r) for a in ("s3:GetObject*", "s3:GetBucket*", "s3:List*")
          for r in (f"{_ARN}:s3:::${{AirflowBucket}}", f"{_ARN}:s3:::${{AirflowBucket}}/*")),
        ("s3:GetAccountPublicAccessBlock", "*"),
        *((a, f"{_LOGS}airflow-${{MwaaEnvironmentName}}-*")
          for a in ("logs:CreateLogStream", "logs:CreateLogGroup", "logs:PutLogEvents", "logs:GetLogEvents",
                    "logs:GetLogRecord", "logs:GetLogGroupFields", "logs:GetQueryResults")),
        ("logs:DescribeLogGroups", "*"), ("cloudwatch:PutMetricData", "*"),
        *((a, f"{_ARN}:sqs:${{AWS::Region}}:*:airflow-celery-*")
          for a in ("sqs:ChangeMessageVisibility", "sqs:DeleteMessage", "sqs:GetQueueAttributes", "sqs:GetQueueUrl",
                    "sqs:ReceiveMessage", "sqs:SendMessage")),
        *((a, f"!{_ARN}:kms:*:${{AWS::AccountId}}:key/*")  # the AWS-owned SQS key only
          for a in ("kms:Decrypt", "kms:DescribeKey", "kms:GenerateDataKey*", "kms:Encrypt")),
    },
}


def data_needs(areas: Mapping[str, str]) -> set[Need]:
    """The S3 (action, resource) pairs of `{area: access letters}`."""
    out: set[Need] = set()
    for area, access in areas.items():
        bucket, prefix = AREAS[area]
        for c in access:
            res = f"{_ARN}:s3:::{bucket}#{prefix}/*" if c == "L" else f"{_ARN}:s3:::{bucket}/{prefix}/*"
            out.add((_S3_ACTIONS[c], res))
    return out


def required_actions(tasks: Iterator[Any] | list[Any]) -> dict[Role, set[Need]]:
    """What each role must be allowed, derived from the DAGs' tasks: each operator's API calls and its job's data
    (under the job's role), each Python task's data (under the Airflow role), and each service's own needs.
    Raises KeyError naming a task whose needs are not declared here."""
    roles: tuple[Role, ...] = ("airflow", "spark-build", "inference", "training")
    need: dict[Role, set[Need]] = {r: set(SERVICE_NEEDS.get(r, set())) for r in roles}
    for t in tasks:
        if isinstance(t, RemoteEmrServerlessJobOperator):
            need["airflow"] |= _emr_operator_needs(t.kind)
            need[JOB_ROLE[t.kind]] |= data_needs(JOB_DATA[t.kind])
        elif isinstance(t, RemoteSageMakerTrainingOperator):
            need["airflow"] |= _sagemaker_operator_needs()
            need["training"] |= data_needs(JOB_DATA["train"])
        elif t.task_id in TASK_DATA:
            need["airflow"] |= data_needs(TASK_DATA[t.task_id])
        else:
            raise KeyError(f"task {t.task_id!r} ({type(t).__name__}) has no declared AWS needs: add it to "
                           "pipeline/orchestration/aws.py TASK_DATA (or its operator's needs), then grant them in infra/iam.yaml")
    return need
