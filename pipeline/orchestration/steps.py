"""What the Airflow tasks call: each step of the weekly and daily stories, as typed jobs.

A step builds a job from `Settings` (the RECSYS_* environment) and the previous step's typed result, runs it and
returns its typed result; the DAG task hands that result on as XCom (`to_xcom()`, small JSON) and the next task
reads it back (each step takes the result or its JSON). Nothing here builds command lines or parses printed
output: the `recsys` CLI and these steps build the same jobs. Settings come from the environment, so the same
DAGs run locally (embedded defaults under RECSYS_HOME) and in production (S3 lake, remote MLflow) by configuration
only.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterator
from typing import Any

from pipeline.data.build_matrix import BuildMatrixJob, BuildResult
from pipeline.io.dates import parse_date
from pipeline.io.items import items_uri
from pipeline.io.lake import resolve
from pipeline.io.redact import redact_text
from pipeline.job import Job, JobResult
from pipeline.orchestration import remote
from pipeline.orchestration.settings import Settings  # the one settings class (re-exported for the DAG tasks)
from pipeline.serving.job import InferJob, InferResult
from pipeline.serving.monitoring import load_monitor_config
from pipeline.training.candidates import CandidatesJob, CandidatesResult, load_candidates
from pipeline.training.gate import GateJob, GateResult
from pipeline.training.gates import load_gate_config
from pipeline.training.train_job import TrainJob, TrainResult, load_config

__all__ = ["GateRejected", "Settings", "StepFailed", "build_matrix", "build_matrix_job", "candidates_job",
           "champion_version", "collect", "gate", "infer", "infer_job", "stage", "train", "train_candidates", "train_job"]


class StepFailed(RuntimeError):
    """A step's error whose message had to be redacted (see `_no_credentials`)."""


class GateRejected(RuntimeError):
    """The candidate failed its gates (enabled mode): the weekly run fails, `champion` is unchanged."""


@contextlib.contextmanager
def _no_credentials() -> Iterator[None]:
    """A failed step's message reaches Airflow's UI and alerts: it must not carry a URL's user:password or
    tokens (a tracking URI's, in an MLflow error). A message without any is re-raised untouched (traceback kept);
    one with them is replaced, without the original chained to it."""
    try:
        yield
    except Exception as e:
        text = str(e)
        safe = redact_text(text)
        if safe == text:
            raise
        raise StepFailed(f"{type(e).__name__}: {safe}") from None


def build_matrix_job(s: Settings, as_of: dt.date | str) -> BuildMatrixJob:
    """Weekly: the build of the window ending at `as_of`, on the settings' Spark master; the catalogue's items of
    that date (`recsys ingest --format items`: <lake>/items/dt=AS_OF) are joined in when published, so training
    fits the bundle's cold head (pipeline.training.cold_head_fit)."""
    day = parse_date(as_of)
    items = items_uri(s.lake_uri, day)
    return BuildMatrixJob(events=s.events_uri, as_of=day, window_days=s.window_days, out=s.lake_uri,
                          spark=s.spark(), items=items if resolve(items).exists() else None)


def build_matrix(s: Settings, as_of: dt.date | str) -> BuildResult:
    """Weekly: the matrix snapshot of the window ending at `as_of` (in this process)."""
    return build_matrix_job(s, as_of).run()


def train_job(s: Settings, build: BuildResult | dict[str, Any]) -> TrainJob:
    """Weekly: training on the snapshot just built (RECSYS_TRAIN_CONFIG's keys, with the settings' device,
    registered name and tracking URI over them); in the spark profile, launched onto the cluster's workers."""
    build = BuildResult.model_validate(build)  # a result, or its XCom JSON
    overrides: dict[str, Any] = {"snapshot": build.snapshot_uri, "device": s.device, "registered_name": s.model_name,
                                 "tracking_uri": s.tracking_uri}
    if s.profile == "spark":
        overrides |= {"distributed": {"num_processes": s.train_processes, "use_gpu": s.train_gpu,
                                      "spark_master": s.spark_master}}
    return load_config(s.train_config, overrides)


def train(s: Settings, build: BuildResult | dict[str, Any]) -> TrainResult:
    """Weekly: train on the snapshot just built and register a `challenger` version (in this process)."""
    job = train_job(s, build)
    with _no_credentials():
        return job.run()


def candidates_job(s: Settings, build: BuildResult | dict[str, Any]) -> CandidatesJob:
    """Weekly, with RECSYS_CANDIDATES_CONFIG: every candidate of the file on the snapshot just built, registered under
    the settings' name, gated with the settings' gate mode, thresholds and ledger (the settings' device for all)."""
    build = BuildResult.model_validate(build)
    overrides: dict[str, Any] = {"snapshot": build.snapshot_uri, "registered_name": s.model_name,
                                 "tracking_uri": s.tracking_uri, "mode": s.gate_mode, "ledger_uri": s.ledger,
                                 "gates_file": s.gate_config, "common": {"device": s.device}}
    return load_candidates(s.candidates_config, overrides)


def train_candidates(s: Settings, build: BuildResult | dict[str, Any]) -> CandidatesResult:
    """Weekly, with RECSYS_CANDIDATES_CONFIG: train, gate and promote the best passing candidate (in this process).
    In enabled mode, none passing raises GateRejected after every verdict is recorded, as `gate` does."""
    job = candidates_job(s, build)
    with _no_credentials():
        result = job.run()
    if result.promoted is None and s.gate_mode == "enabled":
        failed = "; ".join(f"{c.model} v{c.version}: " + (", ".join(v.gate for v in c.verdicts if v.status == "fail")
                                                          or c.held or "?") for c in result.candidates)
        raise GateRejected(f"no candidate of {result.model_name} passed its gates ({failed}); "
                           f"champion stays {result.champion or 'none'}")
    return result


def gate(s: Settings, trained: TrainResult | dict[str, Any]) -> GateResult:
    """Weekly: gate the version just trained; a pass moves `champion`. A rejection in enabled mode raises
    GateRejected (the run fails, visibly) after the verdict and the ledger line are recorded."""
    trained = TrainResult.model_validate(trained)
    job = GateJob(model_name=trained.model_name, version=trained.version, mode=s.gate_mode,
                  gates=load_gate_config(s.gate_config), ledger_uri=s.ledger, tracking_uri=s.tracking_uri)
    with _no_credentials():
        result = job.run()
    if not result.passed and s.gate_mode == "enabled":
        failed = ", ".join(v.gate for v in result.verdicts if v.status == "fail") or "?"
        raise GateRejected(f"{result.model_name} version {result.version} failed its gates ({failed}); "
                           f"champion stays {result.champion or 'none'}")
    return result


def champion_version(s: Settings) -> str | None:
    """The version behind alias `champion`, or None when no model was promoted yet."""
    from pipeline.io.registry import alias_version

    with _no_credentials():
        return alias_version(s.model_name, "champion", s.tracking_uri)


def infer_job(s: Settings, date: dt.date | str) -> InferJob:
    """Daily: every active user's top-N from the champion for `date`; the Spark engine outside the embedded profile;
    only the titles on the date's availability list when the deployment sets one (RECSYS_AVAILABILITY_URI), and
    without each user's excluded titles of the date when it sets an exclusion list (RECSYS_EXCLUSIONS_URI); the
    date's catalogue (<lake>/items/dt=DATE, when published) gives the titles new since training to the cold head."""
    day = parse_date(date)
    return InferJob(date=day, availability=s.availability_for(day), exclusions=s.exclusions_for(day),
                    items=items_uri(s.lake_uri, day), max_model_mb=s.max_model_mb,
                    events=s.events_uri, out=s.recs_uri, model=f"models:/{s.model_name}@champion",
                    top_n=s.top_n, device=s.device, tracking_uri=s.tracking_uri,
                    engine="local" if s.profile == "embedded" else "spark",
                    spark=None if s.profile == "embedded" else s.spark(),
                    monitor=load_monitor_config(s.monitor_config), retention_days=s.recs_retention_days)


def infer(s: Settings, date: dt.date | str) -> InferResult:
    """Daily: score and publish `date` atomically (in this process)."""
    job = infer_job(s, date)
    with _no_credentials():
        return job.run()


def stage(s: Settings, job: Job, *key: str) -> str:
    """Remote profiles: stage `job`'s envelope under RECSYS_STAGING_URI/<key> (dag, run, task); its URI is what the
    engine's operator runs `pipeline.orchestration.remote` on."""
    return remote.stage(job, resolve(s.staging_uri).join(remote.staging_key(*key)).uri)


def collect(envelope_uri: str) -> JobResult:
    """Remote profiles: the typed result the remote run left (RemoteJobFailed with its one-line message)."""
    with _no_credentials():
        return remote.collect(envelope_uri)
