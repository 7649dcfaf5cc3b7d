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
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pipeline.data.build_matrix import BuildMatrixJob, BuildResult
from pipeline.io.dates import parse_date
from pipeline.io.redact import redact_text
from pipeline.serving.job import InferJob, InferResult
from pipeline.training import DEFAULT_REGISTERED_NAME
from pipeline.training.gate import GateJob, GateResult
from pipeline.training.gates import load_gate_config
from pipeline.training.train_job import TrainResult, load_config


class Settings(BaseModel):
    """Where things live and how the scheduled jobs run; one value per RECSYS_* variable (see `from_env`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    home: Path = Field(description="RECSYS_HOME: the embedded default's folder")
    events_uri: str
    lake_uri: str
    recs_uri: str
    tracking_uri: str
    model_name: str = DEFAULT_REGISTERED_NAME
    window_days: int = Field(365, ge=1)
    top_n: int = Field(100, ge=1)
    device: str = "auto"
    spark_master: str = "local[2]"
    train_config: str | None = None
    gate_mode: str = "enabled"
    gate_config: str | None = None

    @classmethod
    def from_env(cls) -> Settings:
        """The settings from RECSYS_* (and MLFLOW_TRACKING_URI), defaults under RECSYS_HOME."""
        home = Path(os.environ.get("RECSYS_HOME", Path.home() / ".recsys")).expanduser().resolve()
        env = os.environ.get
        return cls(
            home=home,
            events_uri=env("RECSYS_EVENTS_URI", str(home / "events")),
            lake_uri=env("RECSYS_LAKE_URI", str(home / "lake")),
            recs_uri=env("RECSYS_RECS_URI", str(home / "lake")),
            tracking_uri=env("MLFLOW_TRACKING_URI") or f"sqlite:///{home / 'mlflow.db'}",  # = pipeline.io.registry's default
            model_name=env("RECSYS_MODEL_NAME", DEFAULT_REGISTERED_NAME),
            window_days=int(env("RECSYS_WINDOW_DAYS", "365")),
            top_n=int(env("RECSYS_TOP_N", "100")),
            device=env("RECSYS_DEVICE", "auto"),
            spark_master=env("RECSYS_SPARK_MASTER", "local[2]"),
            train_config=env("RECSYS_TRAIN_CONFIG") or None,
            gate_mode=env("RECSYS_GATE_MODE", "enabled"),
            gate_config=env("RECSYS_GATE_CONFIG") or None,
        )


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


def build_matrix(s: Settings, as_of: dt.date | str) -> BuildResult:
    """Weekly: the matrix snapshot of the window ending at `as_of`."""
    job = BuildMatrixJob(events=s.events_uri, as_of=parse_date(as_of), window_days=s.window_days, out=s.lake_uri,
                         spark_master=s.spark_master)
    return job.run()


def train(s: Settings, build: BuildResult | dict[str, Any]) -> TrainResult:
    """Weekly: train on the snapshot just built, register a `challenger` version (RECSYS_TRAIN_CONFIG's keys,
    with the settings' device, registered name and tracking URI over them)."""
    build = BuildResult.model_validate(build)  # a result, or its XCom JSON
    job = load_config(s.train_config, {"snapshot": build.snapshot_uri, "device": s.device,
                                       "registered_name": s.model_name, "tracking_uri": s.tracking_uri})
    with _no_credentials():
        return job.run()


def gate(s: Settings, trained: TrainResult | dict[str, Any]) -> GateResult:
    """Weekly: gate the version just trained; a pass moves `champion`. A rejection in enabled mode raises
    GateRejected (the run fails, visibly) after the verdict and the ledger line are recorded."""
    trained = TrainResult.model_validate(trained)
    job = GateJob(model_name=trained.model_name, version=trained.version, mode=s.gate_mode,
                  gates=load_gate_config(s.gate_config), tracking_uri=s.tracking_uri)
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


def infer(s: Settings, date: dt.date | str) -> InferResult:
    """Daily: every active user's top-N from the champion for `date`, published atomically."""
    job = InferJob(date=parse_date(date), events=s.events_uri, out=s.recs_uri, model=f"models:/{s.model_name}@champion",
                   top_n=s.top_n, device=s.device, tracking_uri=s.tracking_uri)
    with _no_credentials():
        return job.run()
