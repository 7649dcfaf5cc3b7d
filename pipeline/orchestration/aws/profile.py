"""The `aws` profile's settings: `AwsProfile`, one RECSYS_AWS_<FIELD> variable per field, each validated on read."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from pipeline.errors import DataError

ENV_PREFIX = "RECSYS_AWS_"
_ROLE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]{1,512}$")
_S3_URI = re.compile(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\s?#]*)?$")
# an ECR image pinned by tag or digest (the repositories are tag-immutable; `latest` would move under a retry)
ECR_IMAGE = re.compile(r"^(?P<account>\d{12})\.dkr\.ecr\.(?P<region>[a-z0-9-]+)\.amazonaws\.com(\.cn)?/"
                       r"(?P<repo>[a-z0-9][a-z0-9._/-]{1,254})(:(?P<tag>[\w][\w.-]{0,127})|@(?P<digest>sha256:[0-9a-f]{64}))$")
_REGION = re.compile(r"^[a-z]{2}(-gov|-iso[a-z]?)?-[a-z]+-\d$")
# a Secrets Manager secret's complete ARN (the name and the 6 characters Secrets Manager appends): IAM grants exactly it
SECRET_ARN = re.compile(r"^arn:aws[a-z-]*:secretsmanager:(?P<region>[a-z0-9-]+):\d{12}:secret:"
                        r"[A-Za-z0-9/_+=.@-]{1,512}-[A-Za-z0-9]{6}$")
# where docker/spark.Dockerfile installs the project (a venv of the release's Python 3.11)
IMAGE_PYTHON = "/opt/recsys/bin/python"
IMAGE_ENTRY_POINT = "local:///opt/recsys/lib/python3.11/site-packages/pipeline/orchestration/remote.py"
# the optional settings an empty variable unsets
_EMPTY_IS_NONE = frozenset({"aws_conn_id", "emr_log_uri", "mlflow_secret_arn", "emr_python"})
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
    emr_entry_point: str = Field(IMAGE_ENTRY_POINT, description="remote.py where EMR Serverless reads it: in the "
                                 "custom image (docker/spark.Dockerfile), or s3://.../remote.py")
    emr_python: str | None = Field(IMAGE_PYTHON, description="the interpreter of the jobs' driver and executors: the "
                                   "custom image's venv (None: the release's own python3, which lacks the project)")
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
    # MLflow credentials of the remote jobs that use MLflow (train, infer): a reference to them, never their value
    mlflow_secret_arn: str | None = Field(
        None, description="Secrets Manager secret (complete ARN, in the profile's region) holding the tracking server's "
                          "credentials as JSON {username, password} or {token}; the training and inference jobs read it "
                          "with their role (None: the server needs no credentials, or the job role is enough)")
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

    @field_validator("emr_python")
    @classmethod
    def _python(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^/[\w./+-]+$", v):
            raise ValueError(f"{v!r} is not an absolute path to an interpreter in the image (like {IMAGE_PYTHON})")
        return v

    @field_validator("mlflow_secret_arn")
    @classmethod
    def _secret(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        m = SECRET_ARN.match(v)
        if not m:
            raise ValueError(f"{v!r} is not a Secrets Manager secret's complete ARN "
                             "(arn:aws:secretsmanager:<region>:<account>:secret:<name>-<6 characters>, as describe-secret shows)")
        region = info.data.get("region")
        if region and m["region"] != region:
            raise ValueError(f"the MLflow secret is in {m['region']}, the profile in {region}: "
                             "the jobs read it in their own region (replicate the secret there)")
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
        m = ECR_IMAGE.match(v)
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
        m = ECR_IMAGE.match(self.training_image_uri)
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
                values[name] = None if (name in _EMPTY_IS_NONE and raw == "") else raw
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

