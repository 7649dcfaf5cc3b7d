"""What the Airflow tasks call: each step of the weekly and daily stories, through the `recsys` CLI interface.

DAG files only wire these together; every step can also be run by hand with the same `recsys` command.
Settings come from the environment (RECSYS_*), so the same DAGs run locally (embedded defaults under
RECSYS_HOME) and in production (S3 lake, remote MLflow) by configuration only.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import os
import re
import sys
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from pipeline.errors import DataError
from pipeline.redact import redact_argv

_VERSION_LINE = re.compile(r"registered (?P<name>\S+) version (?P<version>\d+)\s*$")


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    home: Path = Field(description="RECSYS_HOME: the embedded default's folder")
    events_uri: str
    lake_uri: str
    recs_uri: str
    tracking_uri: str
    model_name: str = "recsys-multivae-pia"
    window_days: int = Field(365, ge=1)
    top_n: int = Field(100, ge=1)
    device: str = "auto"
    spark_master: str = "local[2]"
    train_config: str | None = None
    gate_mode: str = "enabled"
    gate_config: str | None = None

    @classmethod
    def from_env(cls) -> Settings:
        home = Path(os.environ.get("RECSYS_HOME", Path.home() / ".recsys")).expanduser().resolve()
        env = os.environ.get
        return cls(
            home=home,
            events_uri=env("RECSYS_EVENTS_URI", str(home / "events")),
            lake_uri=env("RECSYS_LAKE_URI", str(home / "lake")),
            recs_uri=env("RECSYS_RECS_URI", str(home / "lake")),
            tracking_uri=env("MLFLOW_TRACKING_URI") or f"sqlite:///{home / 'mlflow.db'}",  # = pipeline.registry's default
            model_name=env("RECSYS_MODEL_NAME", "recsys-multivae-pia"),
            window_days=int(env("RECSYS_WINDOW_DAYS", "365")),
            top_n=int(env("RECSYS_TOP_N", "100")),
            device=env("RECSYS_DEVICE", "auto"),
            spark_master=env("RECSYS_SPARK_MASTER", "local[2]"),
            train_config=env("RECSYS_TRAIN_CONFIG") or None,
            gate_mode=env("RECSYS_GATE_MODE", "enabled"),
            gate_config=env("RECSYS_GATE_CONFIG") or None,
        )


def check_date(value: str) -> str:
    try:
        return dt.date.fromisoformat(value).isoformat()
    except ValueError as e:
        raise DataError(f"invalid date {value!r}", "use YYYY-MM-DD") from e


def recsys(*argv: str) -> str:
    """Run one `recsys` command in this process; return its stdout (also echoed); raise on a non-zero exit."""
    from pipeline.cli import main

    buf = io.StringIO()

    class Tee(io.TextIOBase):
        def write(self, s: str) -> int:
            buf.write(s)
            return sys.__stdout__.write(s) if sys.__stdout__ else len(s)

    with contextlib.redirect_stdout(Tee()):
        rc = main(list(argv))
    if rc != 0:
        # redacted: --tracking-uri may carry user:password, and this message reaches Airflow's UI and alerts
        raise RuntimeError(f"`recsys {' '.join(redact_argv(argv))}` failed with exit code {rc} "
                           "(its message is in the log above)")
    return buf.getvalue()


def snapshot_uri(s: Settings, as_of: str) -> str:
    return f"{s.lake_uri.rstrip('/')}/snapshots/as_of={check_date(as_of)}"


def build_matrix(s: Settings, as_of: str) -> str:
    recsys("build-matrix", "--events", s.events_uri, "--as-of", check_date(as_of), "--window-days", str(s.window_days),
           "--out", s.lake_uri, "--spark-master", s.spark_master)
    return snapshot_uri(s, as_of)


def train(s: Settings, snapshot: str) -> int:
    args = ["train", "--snapshot", snapshot, "--device", s.device, "--registered-name", s.model_name,
            "--tracking-uri", s.tracking_uri]
    if s.train_config:
        args += ["--config", s.train_config]
    out = recsys(*args)
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    m = _VERSION_LINE.search(lines[-1]) if lines else None
    if m is None:
        raise RuntimeError(f"`recsys train` did not print the registered version on its last line: {lines[-1:]}")
    return int(m["version"])


def gate(s: Settings, version: int) -> str:
    args = ["gate", "--model", s.model_name, "--version", str(version), "--mode", s.gate_mode,
            "--tracking-uri", s.tracking_uri]
    if s.gate_config:
        args += ["--config", s.gate_config]
    return recsys(*args)


def champion_version(s: Settings) -> str | None:
    """The version behind alias `champion`, or None when no model was promoted yet."""
    from pipeline.registry import alias_version

    return alias_version(s.model_name, "champion", s.tracking_uri)


def infer(s: Settings, date: str) -> str:
    os.environ["MLFLOW_TRACKING_URI"] = s.tracking_uri  # the registry that models:/ resolves against
    recsys("infer", "--date", check_date(date), "--events", s.events_uri, "--out", s.recs_uri,
           "--model", f"models:/{s.model_name}@champion", "--top-n", str(s.top_n), "--device", s.device)
    return f"{s.recs_uri.rstrip('/')}/recommendations/dt={check_date(date)}"
