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
envelope: the remote side gets them from its own environment (role, MLFLOW_TRACKING_USERNAME/PASSWORD).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.data.build_matrix import BuildMatrixJob, BuildResult
from pipeline.errors import DataError
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
    return redact_text(" ".join(text.split()))


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
    try:
        outcome = execute(args[0])
    except BaseException as e:  # the outcome file has the details; the engine gets one line and a failing exit code
        _report_failure(f"recsys remote job failed: {type(e).__name__}: {_one_line(e)}")
        return 1
    log.info("remote %s job finished; outcome written next to %s", outcome.kind, redact_text(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
