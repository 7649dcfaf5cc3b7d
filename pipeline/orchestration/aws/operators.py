"""The `aws` profile's operators: EMR Serverless runs the Spark jobs, a SageMaker training job trains on a GPU.

Each remote step is three tasks: a prepare task stages the job's envelope (pipeline.orchestration.remote.stage),
an operator built here (`emr_serverless_job`, `training_job`) runs `pipeline/orchestration/remote.py` on that
envelope's URI and waits for it deferred (the triggers poll from the triggerer, polling.py; no worker slot is held),
and a collect task reads the typed result back (`remote.collect`). The operators are the provider's, subclassed only to

- name each remote job per try (naming.py), so a resumed try attaches to its job instead of starting a second one;
- check the role and the training image before anything is started (a missing one is one line naming the fix);
- fail with the remote job's own one-line message (its outcome next to the envelope) instead of the provider's
  generic "job failed";
- hand the jobs that use MLflow (training, inference; not the matrix build) the ARN of the MLflow credentials'
  secret (`AwsProfile.mlflow_secret_arn`) as RECSYS_MLFLOW_SECRET_ARN: a reference, never the value. remote.py reads
  the secret with the job's role. Inference needs it on the Spark driver only: the driver loads the model from the
  registry and broadcasts its bytes; executors never contact MLflow (pipeline/serving/spark_engine.py).

Training goes to a **SageMaker training job**, not AWS Batch (see `training_job`). What these operators do on AWS
is declared in iam.py.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import Any, Literal, NoReturn

from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
from airflow.providers.amazon.aws.operators.emr import EmrServerlessStartJobOperator
from airflow.providers.amazon.aws.operators.sagemaker import SageMakerTrainingOperator
from airflow.providers.amazon.aws.triggers.sagemaker import SageMakerTrigger
from botocore.exceptions import ClientError

from pipeline.errors import DataError
from pipeline.io.lake import resolve
from pipeline.orchestration.aws.naming import client_token, remote_job_name, try_key
from pipeline.orchestration.aws.polling import DeferThreaded
from pipeline.orchestration.aws.profile import ECR_IMAGE, AwsProfile
from pipeline.orchestration.remote import ENVELOPE, MLFLOW_SECRET_ENV, OUTCOME, RemoteJobFailed, collect

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


# -- preflight: what would otherwise fail inside the service, minutes later ------------------------------------

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
    m = ECR_IMAGE.match(image_uri)
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

# -- EMR Serverless: the Spark jobs --------------------------------------------------------------------------

SparkKind = Literal["build_matrix", "infer"]
# the jobs that talk to the MLflow server (and so get the credentials' secret); the matrix build does not
MLFLOW_KINDS = frozenset({"train", "infer"})
# an EMR Serverless spark-defaults property that sets an environment variable of the driver only
_DRIVER_ENV = "spark.emr-serverless.driverEnv."


class RemoteEmrServerlessJobOperator(DeferThreaded, EmrServerlessStartJobOperator):
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
        dag_id, run_id, task_id, map_index, try_number = try_key(context)
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
    overrides: dict[str, Any] = {}
    if profile.emr_log_uri:
        overrides["monitoringConfiguration"] = {"s3MonitoringConfiguration": {"logUri": profile.emr_log_uri + "/"}}
    defaults: dict[str, str] = {}
    if profile.emr_python:  # the image's venv (the project, torch) for the driver and the executors' Python workers
        defaults |= {_DRIVER_ENV + "PYSPARK_PYTHON": profile.emr_python,
                     _DRIVER_ENV + "PYSPARK_DRIVER_PYTHON": profile.emr_python,
                     "spark.executorEnv.PYSPARK_PYTHON": profile.emr_python}
    if profile.mlflow_secret_arn and kind in MLFLOW_KINDS:  # the driver loads the model; executors get its bytes
        defaults[_DRIVER_ENV + MLFLOW_SECRET_ENV] = profile.mlflow_secret_arn
    if defaults:
        overrides["applicationConfiguration"] = [{"classification": "spark-defaults", "properties": defaults}]
    poll = profile.poll_seconds
    minutes = _service_limit_s(profile.emr_timeout_minutes * 60, poll, kwargs) // 60
    return RemoteEmrServerlessJobOperator(
        task_id=task_id, envelope_uri=envelope_uri, kind=kind, project=profile.project, preflight=profile.preflight,
        application_id=profile.emr_application_id, execution_role_arn=role,
        job_driver={"sparkSubmit": submit}, configuration_overrides=overrides or None,
        # tags: the Airflow role may only act on job runs tagged with the project (infra/iam.yaml SparkJobs)
        config={"tags": {"project": profile.project}, "executionTimeoutMinutes": minutes},
        wait_for_completion=True, deferrable=True, waiter_delay=poll,
        waiter_max_attempts=math.ceil(minutes * 60 / poll) + 2,
        aws_conn_id=profile.aws_conn_id, region_name=profile.region, **kwargs)


# -- SageMaker: GPU training ----------------------------------------------------------------------------------

TRAINING_ENTRY = ["python", "-m", "pipeline.orchestration.remote"]  # docker/train.Dockerfile puts its venv on PATH


class RemoteSageMakerTrainingOperator(DeferThreaded, SageMakerTrainingOperator):
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
        name = remote_job_name(self.project, *try_key(context))
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
        name = str(event.get("job_name") or remote_job_name(self.project, *try_key(context)))
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
    if profile.mlflow_secret_arn:  # the ARN only: remote.py reads the secret with the training role
        config["Environment"][MLFLOW_SECRET_ENV] = profile.mlflow_secret_arn
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


def mlflow_secret_passed(task: Any) -> str | None:
    """The MLflow secret's ARN that a remote operator hands its job (None: none), read from the request itself."""
    if isinstance(task, RemoteSageMakerTrainingOperator):
        return (task.config.get("Environment") or {}).get(MLFLOW_SECRET_ENV)
    if isinstance(task, RemoteEmrServerlessJobOperator):
        for c in (task.configuration_overrides or {}).get("applicationConfiguration", []):
            if c.get("classification") == "spark-defaults" and _DRIVER_ENV + MLFLOW_SECRET_ENV in c.get("properties", {}):
                return str(c["properties"][_DRIVER_ENV + MLFLOW_SECRET_ENV])
    return None
