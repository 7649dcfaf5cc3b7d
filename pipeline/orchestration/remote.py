"""One job, run somewhere else: a spark-submit driver, an EMR Serverless job run, a GPU training container.

The Airflow side stages a `JobEnvelope` (which job, and its typed config as JSON) under the staging area; the
engine runs this module's entry point on it (`python -m pipeline.orchestration.remote ENVELOPE_URI`, or this file
itself as spark-submit's / EMR Serverless's application), which validates the config into the same typed job the
embedded profile runs, runs it, and writes an `Outcome` next to the envelope: the typed result, or the one-line
error. The Airflow side then reads the outcome back with `collect` (the typed result becomes the task's XCom; a
failure becomes `RemoteJobFailed` carrying the remote message). Nothing crosses as argv or printed output but
the envelope's URI.

Retries are safe: running an envelope first removes an earlier try's outcome, and the jobs themselves publish
atomically (a snapshot, a model version, a partition appear whole or not at all). Credentials never go into an
envelope: the remote side gets them from its own environment. AWS access is the job's role. MLflow credentials are
MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN; on AWS the engine passes only a reference,
RECSYS_MLFLOW_SECRET_ARN (the SageMaker job's Environment, the EMR Serverless driver's environment), and the entry
point reads that secret with the job's role before the job runs (`load_mlflow_credentials`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.data.build_matrix import BuildMatrixJob, BuildResult
from pipeline.errors import DataError
from pipeline.io import numba_target
from pipeline.io.lake import resolve
from pipeline.io.redact import redact_text, redact_values
from pipeline.job import Job, JobResult
from pipeline.serving.job import InferJob, InferResult
from pipeline.training.train_job import TrainJob, TrainResult

log = logging.getLogger(__name__)

Kind = Literal["build_matrix", "train", "infer"]
JOBS: dict[str, tuple[type[Job], type[JobResult]]] = {
    "build_matrix": (BuildMatrixJob, BuildResult),
    "train": (TrainJob, TrainResult),
    "infer": (InferJob, InferResult),
}
ENVELOPE = "envelope.json"
OUTCOME = "outcome.json"
ENTRY_POINT = Path(__file__).resolve()  # spark-submit's application file
# SageMaker shows this file's text as the training job's FailureReason (and so does the Airflow task that awaits it)
SAGEMAKER_FAILURE_FILE = "/opt/ml/output/failure"
_KEY = re.compile(r"[^A-Za-z0-9._=-]+")
# the engine's reference to the MLflow credentials (a Secrets Manager ARN), set only for the jobs that use MLflow
MLFLOW_SECRET_ENV = "RECSYS_MLFLOW_SECRET_ARN"
_CREDENTIAL_FORMS = ({"username": "MLFLOW_TRACKING_USERNAME", "password": "MLFLOW_TRACKING_PASSWORD"},
                     {"token": "MLFLOW_TRACKING_TOKEN"})
_CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


class RemoteJobFailed(RuntimeError):
    """The remote job failed (its one-line message), or left no outcome."""


class JobEnvelope(BaseModel):
    """Which job to run and its whole typed config (JSON), as staged for the remote side."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Kind
    job: dict[str, Any]

    @classmethod
    def of(cls, job: Job) -> JobEnvelope:
        """The envelope of a typed job (its kind looked up from its class)."""
        for kind, (job_cls, _) in JOBS.items():
            if type(job) is job_cls:
                return cls(kind=kind, job=json.loads(job.model_dump_json()))
        raise TypeError(f"{type(job).__name__} cannot run remotely: one of {', '.join(c.__name__ for c, _ in JOBS.values())}")

    def build(self) -> Job:
        """The typed job (validated again on the remote side: the envelope is input from outside)."""
        return JOBS[self.kind][0].model_validate(self.job)


class Outcome(BaseModel):
    """What the remote side wrote: the result's JSON, or the error's type and one-line message."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Kind | None  # None: the envelope itself could not be read
    ok: bool
    result: dict[str, Any] | None = None
    error_type: str | None = None
    error: str | None = None


def staging_key(*parts: str) -> str:
    """A safe relative path from names that come from the scheduler (dag id, run id with ':' and '+', task id)."""
    cleaned = [_KEY.sub("_", p).strip("._") or "_" for p in parts]
    return "/".join(cleaned)


def stage(job: Job, staging_uri: str) -> str:
    """Write `job`'s envelope to `<staging_uri>/envelope.json` (removing an earlier outcome there) and return the
    envelope's URI. Refuses a config carrying credentials: they would be stored in the lake."""
    envelope = JobEnvelope.of(job)
    if redact_values(envelope.job) != envelope.job:
        raise DataError(f"the {envelope.kind} job's config carries credentials (a URI with user:password or a token)",
                        "give remote jobs their credentials through their environment (an IAM role, "
                        "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD), not inside a URI")
    folder = resolve(staging_uri)
    folder.join(OUTCOME).delete()
    folder.join(ENVELOPE).write_bytes(envelope.model_dump_json(indent=2).encode(), durable=True)
    return folder.join(ENVELOPE).uri


def _outcome_location(envelope_uri: str):
    env = resolve(envelope_uri)
    if not env.uri.endswith("/" + ENVELOPE) and env.uri != ENVELOPE:
        raise DataError(f"{envelope_uri} is not a staged envelope (it must end with /{ENVELOPE})",
                        "pass the URI the prepare task returned")
    return resolve(env.uri[: -len(ENVELOPE)] + OUTCOME)


def _one_line(e: BaseException) -> str:
    if isinstance(e, ValidationError):
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "config"
        text = f"invalid job config: {where}: {first.get('msg', e)}"
    else:
        text = str(e) or type(e).__name__
    text = redact_text(" ".join(text.split()))
    for var in ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):  # should a library quote one back, mask it
        value = os.environ.get(var, "")
        if len(value) >= 4:
            text = text.replace(value, "***")
    return text


def _secret_error(arn: str, e: Exception) -> DataError:
    """A failed read of the MLflow secret as one line: the cause and the fix (never the secret's text)."""
    from botocore.exceptions import ClientError, NoCredentialsError

    setting = "RECSYS_AWS_MLFLOW_SECRET_ARN"
    if isinstance(e, NoCredentialsError):
        return DataError(f"no AWS credentials to read the MLflow secret {arn} with",
                         "run the job under its job role (infra/iam.yaml TrainingRole / InferenceRole)")
    if not isinstance(e, ClientError):  # no answer at all: network, endpoint
        return DataError(f"Secrets Manager could not be reached to read the MLflow secret {arn} ({type(e).__name__})",
                         "give the job's network a route to Secrets Manager (a VPC endpoint or NAT), then clear the task")
    code = str(e.response.get("Error", {}).get("Code", "Error"))
    if code == "ResourceNotFoundException":
        return DataError(f"the MLflow secret {arn} does not exist (or is scheduled for deletion)",
                         f"create it (docs/runbook.md, 'Running on AWS') or set {setting} to its complete ARN")
    if code == "AccessDeniedException":
        return DataError(f"the job's role may not read the MLflow secret {arn} (AccessDeniedException)",
                         "deploy infra/iam.yaml with MlflowSecretArn set to that ARN (it grants the training and "
                         "inference roles secretsmanager:GetSecretValue on it)")
    if code == "DecryptionFailure":
        return DataError(f"the MLflow secret {arn} cannot be decrypted with the job's role (DecryptionFailure)",
                         "encrypt it with the aws/secretsmanager key, or grant the job roles kms:Decrypt on its key")
    return DataError(f"reading the MLflow secret {arn} failed: {code}",
                     f"correct the secret or {setting} as the error code says, then clear the task")


@contextlib.contextmanager
def _quiet_botocore() -> Iterator[None]:
    """botocore logs response bodies at DEBUG, the secret's value included: not while the secret is read."""
    logger = logging.getLogger("botocore")
    level = logger.level
    logger.setLevel(max(level, logging.INFO))
    try:
        yield
    finally:
        logger.setLevel(level)


def load_mlflow_credentials(environ: MutableMapping[str, str] | None = None) -> str | None:
    """When RECSYS_MLFLOW_SECRET_ARN is set: read that Secrets Manager secret (with this process's AWS credentials:
    the job's role; region from the ARN; AWS_ENDPOINT_URL is honoured) and set MLFLOW_TRACKING_USERNAME/PASSWORD
    (JSON {"username", "password"}) or MLFLOW_TRACKING_TOKEN ({"token"}) in `environ` (os.environ), clearing the
    other form's. Returns which form was set ("basic", "token"), or None when no secret is named. Any failure is one
    DataError naming the cause and the fix; neither the values nor the secret's text ever appear in it or in a log."""
    env = os.environ if environ is None else environ
    arn = env.get(MLFLOW_SECRET_ENV, "").strip()
    if not arn:
        return None
    parts = arn.split(":")
    if len(parts) < 7 or parts[2] != "secretsmanager" or parts[5] != "secret":
        raise DataError(f"{MLFLOW_SECRET_ENV} is not a Secrets Manager secret ARN",
                        "set RECSYS_AWS_MLFLOW_SECRET_ARN to the secret's complete ARN (the operators pass it on)")
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    client = boto3.client("secretsmanager", region_name=parts[3],
                          config=Config(connect_timeout=5, read_timeout=15, retries={"max_attempts": 3, "mode": "standard"}))
    try:
        with _quiet_botocore():
            text = client.get_secret_value(SecretId=arn).get("SecretString")
    except (ClientError, BotoCoreError) as e:
        raise _secret_error(arn, e) from None
    fix = ('store it as a JSON string {"username": "...", "password": "..."} or {"token": "..."} '
           "(aws secretsmanager put-secret-value --secret-string file://mlflow.json)")
    if text is None:
        raise DataError(f"the MLflow secret {arn} holds binary data, not a JSON string", fix)
    try:
        value = json.loads(text)
    except ValueError:
        raise DataError(f"the MLflow secret {arn} is not JSON", fix) from None  # the parser's message may quote it
    form = next((f for f in _CREDENTIAL_FORMS if isinstance(value, dict) and set(value) == set(f)), None)
    if form is None:
        raise DataError(f"the MLflow secret {arn} has neither exactly the keys username and password nor exactly token",
                        fix)
    if not all(isinstance(value[k], str) and value[k] and "\n" not in value[k] for k in form):
        raise DataError(f"the MLflow secret {arn} has an empty, multi-line or non-string value", fix)
    for var in _CREDENTIAL_VARS:
        env.pop(var, None)
    for key, var in form.items():
        env[var] = value[key]
    kind = "token" if "token" in form else "basic"
    log.info("MLflow credentials (%s) read from %s", kind, arn)
    return kind


def execute(envelope_uri: str) -> Outcome:
    """The remote side: read and validate the envelope, run its job, write the outcome next to it (also on
    failure, then re-raise). Returns the outcome written."""
    out = _outcome_location(envelope_uri)
    out.delete()  # an earlier try's outcome must not be read as this one's
    kind: Kind | None = None
    try:
        envelope = JobEnvelope.model_validate_json(resolve(envelope_uri).read_bytes())
        kind = envelope.kind
        job = envelope.build()
        load_mlflow_credentials()  # the engine names the secret only for the jobs that use MLflow
        result = job.run()
        outcome = Outcome(kind=kind, ok=True, result=result.to_xcom())
    except BaseException as e:
        outcome = Outcome(kind=kind, ok=False, error_type=type(e).__name__, error=_one_line(e))
        out.write_bytes(outcome.model_dump_json().encode(), durable=True)
        raise
    out.write_bytes(outcome.model_dump_json().encode(), durable=True)
    return outcome


def collect(envelope_uri: str) -> JobResult:
    """The typed result the remote run left next to `envelope_uri`; RemoteJobFailed with the remote's one-line
    message when it failed, or when it left no outcome (it never started, or was killed)."""
    out = _outcome_location(envelope_uri)
    if not out.exists():
        raise RemoteJobFailed(f"the remote job of {envelope_uri} left no outcome (it did not start, or was killed "
                              "before it finished); see the engine's log for the cause, then clear the task to retry")
    try:
        outcome = Outcome.model_validate_json(out.read_bytes())
    except ValidationError as e:
        raise RemoteJobFailed(f"{out.uri} is not an outcome this version writes ({_one_line(e)}); re-run the task") from e
    if not outcome.ok:
        raise RemoteJobFailed(f"remote {outcome.kind} job failed: {outcome.error_type}: {outcome.error}")
    if outcome.kind is None:
        raise RemoteJobFailed(f"{out.uri} names no job kind; re-run the task")
    return JOBS[outcome.kind][1].model_validate(outcome.result)


def explain_failure(envelope_uri: str, error: BaseException) -> BaseException:
    """What an engine operator should raise when its remote run failed: the remote's own one-line message
    (RemoteJobFailed, from the outcome) when there is one, else the engine's error unchanged."""
    try:
        collect(envelope_uri)
    except RemoteJobFailed as remote_error:
        if "left no outcome" not in str(remote_error):
            return remote_error
    except Exception:  # the outcome is unreadable: the engine's error says more
        return error
    return error


def _report_failure(text: str) -> None:
    """Where the engine shows a failure reason: SageMaker reads /opt/ml/output/failure; every engine keeps stderr."""
    if os.path.isdir(os.path.dirname(SAGEMAKER_FAILURE_FILE)):
        with contextlib.suppress(OSError):
            Path(SAGEMAKER_FAILURE_FILE).write_text(text[:1024])
    print(text, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """`python -m pipeline.orchestration.remote ENVELOPE_URI` (or this file under spark-submit): 0 on success."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m pipeline.orchestration.remote ENVELOPE_URI", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    numba_target.guard()  # before numba loads: which of the image's compiled top-k kernels this CPU uses
    try:
        outcome = execute(args[0])
    except BaseException as e:  # the outcome file has the details; the engine gets one line and a failing exit code
        _report_failure(f"recsys remote job failed: {type(e).__name__}: {_one_line(e)}")
        return 1
    log.info("remote %s job finished; outcome written next to %s", outcome.kind, redact_text(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
