"""Launch a training job: locally (a `recsys train` subprocess or an in-process callable) or on AWS (SageMaker).

One interface for both: a typed `TrainJob`, `launcher.launch(job) -> LaunchResult`, `launcher.wait(result) -> JobOutcome`.
`wait` raises `TrainingFailed` (the backend's reason, e.g. the exit code and the tail of the job's log) or
`TrainingTimeout`. Every identifier that comes from outside (job names, S3 URIs, role ARNs, image URIs,
hyperparameter names) is validated before anything is started, so a bad value fails here with a message, not
half-way through a cloud call.

Hyperparameters become CLI options of `recsys train` the same way on both backends: `{"pia_lambda": 0.1}` ->
`--pia-lambda=0.1` (the `=` form, so a value can never be read as another option); `True` -> `--flag`,
`False` -> omitted. On SageMaker the container runs `recsys train ...` through ContainerEntrypoint/ContainerArguments;
the hyperparameters are also sent as HyperParameters so they show in the console.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

log = logging.getLogger(__name__)

# SageMaker's own patterns (botocore's service model), anchored.
_JOB_NAME = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}")
_ROLE_ARN = re.compile(r"arn:aws[a-z\-]*:iam::\d{12}:role/?[a-zA-Z_0-9+=,.@\-_/]+")
# SageMaker pulls training images from ECR only; require a tag or a digest so a run is reproducible.
_ECR_IMAGE = re.compile(
    r"\d{12}\.dkr\.ecr\.[a-z0-9-]+\.amazonaws\.com(\.cn)?/[a-z0-9]+(?:[._/-][a-z0-9]+)*(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}|@sha256:[0-9a-f]{64})"
)
_INSTANCE_TYPE = re.compile(r"ml\.[a-z0-9]+\.[a-z0-9]+")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_HP_NAME = re.compile(r"[a-z][a-z0-9_]{0,62}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
# Credentials never travel in a job definition (DescribeTrainingJob shows Environment in clear text).
_SECRET_ENV = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

# Inside a SageMaker training container the channel "snapshot" is copied here before `recsys train` starts.
SM_SNAPSHOT_DIR = "/opt/ml/input/data/snapshot"


def _check_job_name(v: str) -> str:
    if not _JOB_NAME.fullmatch(v):
        raise ValueError(f"job name {v!r} must be 1-63 letters, digits or inner hyphens (SageMaker's rule)")
    return v


def _check_s3_uri(v: str) -> str:
    if not v.startswith("s3://"):
        raise ValueError(f"{v!r} is not an S3 URI (s3://bucket/prefix)")
    bucket, _, key = v[len("s3://"):].partition("/")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket or re.fullmatch(r"\d+\.\d+\.\d+\.\d+", bucket):
        raise ValueError(f"{v!r}: bucket {bucket!r} is not a valid S3 bucket name")
    if _CONTROL.search(key) or "//" in key or len(key) > 1024:
        raise ValueError(f"{v!r}: the key has control characters, an empty segment or is too long")
    return v


def _check_role_arn(v: str) -> str:
    if not _ROLE_ARN.fullmatch(v) or len(v) > 2048:
        raise ValueError(f"{v!r} is not an IAM role ARN (arn:aws:iam::<12 digits>:role/<name>)")
    return v


def _check_image(v: str) -> str:
    if not _ECR_IMAGE.fullmatch(v):
        raise ValueError(f"{v!r} is not an ECR image URI with a tag or digest (<acct>.dkr.ecr.<region>.amazonaws.com/repo:tag)")
    return v


JobName = Annotated[str, AfterValidator(_check_job_name)]
S3Uri = Annotated[str, AfterValidator(_check_s3_uri)]
RoleArn = Annotated[str, AfterValidator(_check_role_arn)]
ImageUri = Annotated[str, AfterValidator(_check_image)]
HyperValue = bool | int | float | str


class LaunchError(RuntimeError):
    """The job could not be started or followed."""


class TrainingFailed(LaunchError):
    """The job ran and failed; the message carries the backend's reason."""


class TrainingTimeout(LaunchError):
    """The job did not finish within the wait's timeout (it is still running)."""


class TrainJob(BaseModel):
    """What to train: the same on every backend."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: JobName
    snapshot: str = Field(description="matrix snapshot: a local folder (local backend) or an s3:// prefix")
    # SageMaker uploads /opt/ml/model here (an s3:// prefix, required there); the model itself goes to MLflow.
    output: str | None = Field(default=None, description="s3:// prefix for the job's output (SageMaker)")
    hyperparameters: dict[str, HyperValue] = Field(default_factory=dict)
    env: dict[str, str] = Field(default_factory=dict, description="extra environment, e.g. MLFLOW_TRACKING_URI")

    @field_validator("snapshot", "output")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v or _CONTROL.search(v):
            raise ValueError("must be a non-empty path or s3:// URI without control characters")
        return _check_s3_uri(v) if v.startswith("s3://") else v

    @field_validator("hyperparameters")
    @classmethod
    def _hp(cls, v: dict[str, HyperValue]) -> dict[str, HyperValue]:
        if len(v) > 90:  # SageMaker allows 100 container arguments; keep room for the fixed ones
            raise ValueError("at most 90 hyperparameters")
        for k, val in v.items():
            if not _HP_NAME.fullmatch(k):
                raise ValueError(f"hyperparameter name {k!r} must be lowercase snake_case (it becomes --{k.replace('_', '-')})")
            if isinstance(val, str) and (_CONTROL.search(val) or len(val) > 200):
                raise ValueError(f"hyperparameter {k!r}: value has control characters or is longer than 200")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        for k in v:
            if not _ENV_NAME.fullmatch(k):
                raise ValueError(f"environment variable name {k!r} is not valid")
            if _SECRET_ENV.search(k):
                raise ValueError(f"{k!r} looks like a credential: give the job an IAM role or a secret reference instead")
        return v


def cli_args(job: TrainJob, snapshot: str | None = None) -> list[str]:
    """`train --snapshot=... --<hp>=<value> ...`: the arguments after `recsys` (the model goes to MLflow)."""
    args = ["train", f"--snapshot={snapshot or job.snapshot}"]
    for k, v in sorted(job.hyperparameters.items()):
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            if v:
                args.append(flag)
        else:
            args.append(f"{flag}={v}")
    return args


class LaunchResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    job_name: str
    backend: Literal["local", "sagemaker"]
    handle: str = Field(description="the process id (local) or the training job ARN (SageMaker)")
    started_at: datetime
    log_path: Path | None = None


class JobOutcome(BaseModel):
    model_config = ConfigDict(frozen=True)

    job_name: str
    status: Literal["Completed", "Failed", "Stopped"]
    duration_s: float
    reason: str = ""
    model_artifacts: str | None = None


class Launcher(Protocol):
    def launch(self, job: TrainJob) -> LaunchResult: ...

    def wait(self, result: LaunchResult, timeout_s: float = ..., poll_s: float = ...) -> JobOutcome: ...


# ---------------------------------------------------------------- local


class LocalConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    backend: Literal["local"] = "local"
    # argv before the CLI arguments; default: this interpreter running the CLI module (works without the
    # console script on PATH). Tests put any command here.
    command: tuple[str, ...] = (sys.executable, "-m", "pipeline.cli")
    log_dir: Path = Path("out/launcher-logs")
    tail_lines: int = 20


InProcess = Callable[[list[str]], int]


class LocalLauncher:
    """Runs `recsys train ...` as a subprocess (stdout+stderr to a log file), or calls `runner(argv)` in process."""

    def __init__(self, config: LocalConfig | None = None, runner: InProcess | None = None) -> None:
        self.config = config or LocalConfig()
        self.runner = runner
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._done: dict[str, tuple[int, float, str]] = {}  # in-process: (exit code, duration, error)
        self._lock = threading.Lock()

    def argv(self, job: TrainJob) -> list[str]:
        return [*self.config.command, *cli_args(job)]

    def launch(self, job: TrainJob) -> LaunchResult:
        if not job.snapshot.startswith("s3://") and not Path(job.snapshot).exists():
            log.warning("snapshot %s does not exist (yet)", job.snapshot)
        started = datetime.now(UTC)
        with self._lock:
            if job.name in self._procs or job.name in self._done:
                raise LaunchError(f"a job named {job.name!r} was already launched here; use a new name per run")
        if self.runner is not None:
            return self._run_in_process(job, started)
        self.config.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.config.log_dir / f"{job.name}.log"
        env = {**os.environ, **job.env}
        argv = self.argv(job)
        with open(log_path, "wb") as fh:  # the child keeps its own copy of the descriptor
            try:
                proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
            except OSError as e:
                raise LaunchError(f"cannot start {argv[0]!r}: {e.strerror}. Fix: install the project (pip install .)") from e
        with self._lock:
            self._procs[job.name] = proc
        log.info("launched %s locally (pid %d), log %s", job.name, proc.pid, log_path)
        return LaunchResult(job_name=job.name, backend="local", handle=str(proc.pid), started_at=started, log_path=log_path)

    def _run_in_process(self, job: TrainJob, started: datetime) -> LaunchResult:
        assert self.runner is not None
        t0 = time.monotonic()
        error = ""
        try:
            code = self.runner(cli_args(job))
        except Exception as e:  # the callable's failure becomes the job's failure, reported by wait()
            code, error = 1, f"{type(e).__name__}: {e}"
        with self._lock:
            self._done[job.name] = (code, time.monotonic() - t0, error)
        return LaunchResult(job_name=job.name, backend="local", handle=f"in-process:{os.getpid()}", started_at=started)

    def wait(self, result: LaunchResult, timeout_s: float = 24 * 3600, poll_s: float = 0.2) -> JobOutcome:
        if result.job_name in self._done:
            code, duration, error = self._done[result.job_name]
            return self._outcome(result, code, duration, error or f"exit code {code}")
        proc = self._procs.get(result.job_name)
        if proc is None:
            raise LaunchError(f"no job named {result.job_name!r} was launched by this launcher")
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired as e:
            raise TrainingTimeout(f"job {result.job_name} (pid {proc.pid}) still running after {timeout_s:.0f} s") from e
        duration = (datetime.now(UTC) - result.started_at).total_seconds()
        reason = f"exit code {code}"
        if code != 0 and result.log_path is not None:
            reason += f"; last lines of {result.log_path}:\n{self._tail(result.log_path)}"
        return self._outcome(result, code, duration, reason)

    def _tail(self, path: Path) -> str:
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            return "(log unreadable)"
        return "\n".join(lines[-self.config.tail_lines:])

    @staticmethod
    def _outcome(result: LaunchResult, code: int, duration: float, reason: str) -> JobOutcome:
        if code != 0:
            raise TrainingFailed(f"training job {result.job_name} failed: {reason}")
        return JobOutcome(job_name=result.job_name, status="Completed", duration_s=duration)


# ---------------------------------------------------------------- SageMaker


class SageMakerConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    backend: Literal["sagemaker"] = "sagemaker"
    image_uri: ImageUri
    role_arn: RoleArn
    instance_type: str = "ml.g5.xlarge"  # one A10G, 24 GB: ample for Multi-VAE on ~20k-50k items
    instance_count: int = Field(default=1, ge=1, le=1)  # the trainer is single-device
    volume_gb: int = Field(default=50, ge=1, le=16384)
    max_runtime_s: int = Field(default=6 * 3600, ge=60, le=28 * 24 * 3600)
    volume_kms_key: str | None = None
    output_kms_key: str | None = None
    subnets: tuple[str, ...] = ()
    security_groups: tuple[str, ...] = ()
    region: str = "us-east-1"
    endpoint_url: str | None = None  # tests: a moto server on 127.0.0.1
    tags: dict[str, str] = Field(default_factory=lambda: {"project": "recsys-pia"})

    @field_validator("instance_type")
    @classmethod
    def _itype(cls, v: str) -> str:
        if not _INSTANCE_TYPE.fullmatch(v):
            raise ValueError(f"{v!r} is not a SageMaker instance type (e.g. ml.g5.xlarge)")
        return v


_TERMINAL = {"Completed", "Failed", "Stopped"}


class SageMakerLauncher:
    """One SageMaker training job per `TrainJob`: the snapshot is the `snapshot` channel, /opt/ml/model goes to `output`."""

    def __init__(self, config: SageMakerConfig, client: Any | None = None, sleep: Callable[[float], None] = time.sleep) -> None:
        self.config = config
        self._sleep = sleep
        if client is None:
            import boto3  # only this backend needs it

            client = boto3.client("sagemaker", region_name=config.region, endpoint_url=config.endpoint_url)
        self.client = client

    def request(self, job: TrainJob) -> dict[str, Any]:
        """The CreateTrainingJob request (pure; tested without AWS)."""
        for field, value in (("snapshot", job.snapshot), ("output", job.output)):
            if value is None or not value.startswith("s3://"):
                raise LaunchError(f"SageMaker needs an s3:// {field}, got {value!r}")
        c = self.config
        snapshot = job.snapshot if job.snapshot.endswith("/") else job.snapshot + "/"
        req: dict[str, Any] = {
            "TrainingJobName": job.name,
            "AlgorithmSpecification": {
                "TrainingImage": c.image_uri,
                "TrainingInputMode": "File",
                "ContainerEntrypoint": ["recsys"],
                "ContainerArguments": cli_args(job, snapshot=SM_SNAPSHOT_DIR),
            },
            "HyperParameters": {k: str(v) for k, v in sorted(job.hyperparameters.items())},
            "RoleArn": c.role_arn,
            "InputDataConfig": [{
                "ChannelName": "snapshot",
                "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": snapshot,
                                                "S3DataDistributionType": "FullyReplicated"}},
                "InputMode": "File",
            }],
            "OutputDataConfig": {"S3OutputPath": job.output},
            "ResourceConfig": {"InstanceType": c.instance_type, "InstanceCount": c.instance_count, "VolumeSizeInGB": c.volume_gb},
            "StoppingCondition": {"MaxRuntimeInSeconds": c.max_runtime_s},
            "EnableInterContainerTrafficEncryption": True,
            "Tags": [{"Key": k, "Value": v} for k, v in sorted(c.tags.items())],
        }
        if job.env:
            req["Environment"] = dict(job.env)
        if c.volume_kms_key:
            req["ResourceConfig"]["VolumeKmsKeyId"] = c.volume_kms_key
        if c.output_kms_key:
            req["OutputDataConfig"]["KmsKeyId"] = c.output_kms_key
        if c.subnets:
            req["VpcConfig"] = {"Subnets": list(c.subnets), "SecurityGroupIds": list(c.security_groups)}
        return req

    def launch(self, job: TrainJob) -> LaunchResult:
        req = self.request(job)
        started = datetime.now(UTC)
        try:
            resp = self.client.create_training_job(**req)
        except Exception as e:  # botocore ClientError/EndpointConnectionError: keep the service's message
            raise LaunchError(f"CreateTrainingJob {job.name} failed: {e}") from e
        arn = resp["TrainingJobArn"]
        log.info("launched SageMaker training job %s (%s) on %s", job.name, arn, self.config.instance_type)
        return LaunchResult(job_name=job.name, backend="sagemaker", handle=arn, started_at=started)

    def wait(self, result: LaunchResult, timeout_s: float = 24 * 3600, poll_s: float = 30.0) -> JobOutcome:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                desc = self.client.describe_training_job(TrainingJobName=result.job_name)
            except Exception as e:
                raise LaunchError(f"DescribeTrainingJob {result.job_name} failed: {e}") from e
            status = desc["TrainingJobStatus"]
            if status in _TERMINAL:
                break
            if time.monotonic() >= deadline:
                raise TrainingTimeout(f"job {result.job_name} still {status} after {timeout_s:.0f} s")
            self._sleep(poll_s)
        start, end = desc.get("TrainingStartTime"), desc.get("TrainingEndTime")
        duration = (end - start).total_seconds() if start and end else (datetime.now(UTC) - result.started_at).total_seconds()
        reason = desc.get("FailureReason", "")
        if status != "Completed":
            raise TrainingFailed(f"training job {result.job_name} {status.lower()}: {reason or 'no reason given'}")
        return JobOutcome(job_name=result.job_name, status="Completed", duration_s=duration, reason=reason,
                          model_artifacts=desc.get("ModelArtifacts", {}).get("S3ModelArtifacts"))


LauncherConfig = Annotated[LocalConfig | SageMakerConfig, Field(discriminator="backend")]


def make_launcher(config: LocalConfig | SageMakerConfig, **kwargs: Any) -> LocalLauncher | SageMakerLauncher:
    if isinstance(config, SageMakerConfig):
        return SageMakerLauncher(config, **kwargs)
    return LocalLauncher(config, **kwargs)


def job_name(prefix: str, when: datetime | None = None) -> str:
    """A unique, valid job name: `<prefix>-YYYYmmdd-HHMMSS` (SageMaker names must be unique per account/region)."""
    when = when or datetime.now(UTC)
    return _check_job_name(f"{prefix}-{when:%Y%m%d-%H%M%S}")


def run(job: TrainJob, config: LocalConfig | SageMakerConfig, timeout_s: float = 24 * 3600,
        extra: Mapping[str, Any] | None = None) -> JobOutcome:
    """Launch and wait: the one call a DAG task needs."""
    launcher = make_launcher(config, **(extra or {}))
    return launcher.wait(launcher.launch(job), timeout_s=timeout_s)


__all__ = [
    "JobOutcome", "LaunchError", "LaunchResult", "Launcher", "LauncherConfig", "LocalConfig", "LocalLauncher",
    "SageMakerConfig", "SageMakerLauncher", "TrainJob", "TrainingFailed", "TrainingTimeout", "cli_args", "job_name",
    "make_launcher", "run",
]
