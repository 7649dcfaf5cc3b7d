"""Where things live and how the scheduled jobs run: one validated value per RECSYS_* variable (pydantic-settings).

The same DAG code runs in every execution profile; `RECSYS_PROFILE` picks where the heavy steps run:

- ``embedded`` (default): in the Airflow worker's own process (`make run`, the fast tests, one box);
- ``spark``: the matrix build and the inference engine are submitted to the Spark cluster at
  ``RECSYS_SPARK_MASTER`` (standalone, YARN, Kubernetes) with spark-submit, and training is launched onto the
  cluster's workers with TorchDistributor (``RECSYS_TRAIN_PROCESSES`` processes, ``RECSYS_TRAIN_GPU``);
- ``aws``: EMR Serverless for the Spark jobs and a SageMaker training job for training (RECSYS_AWS_* settings,
  pipeline/orchestration/aws/profile.py).

A bad value fails when the settings are read, naming the variable (pydantic's per-field message).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from pipeline.errors import DataError
from pipeline.io.redact import redact_text
from pipeline.io.spark import SparkConfig
from pipeline.training import DEFAULT_REGISTERED_NAME

Profile = Literal["embedded", "spark", "aws"]


class Settings(BaseSettings):
    """The RECSYS_* environment (and MLFLOW_TRACKING_URI), defaults under RECSYS_HOME. Keyword arguments override it."""

    model_config = SettingsConfigDict(env_prefix="RECSYS_", frozen=True, extra="forbid", populate_by_name=True)

    home: Path = Field(default_factory=lambda: Path.home() / ".recsys", description="RECSYS_HOME: the embedded default's folder")
    events_uri: str = Field("", description="RECSYS_EVENTS_URI (default HOME/events)")
    lake_uri: str = Field("", description="RECSYS_LAKE_URI: snapshots (default HOME/lake)")
    recs_uri: str = Field("", description="RECSYS_RECS_URI: recommendations (default HOME/lake)")
    staging_uri: str = Field("", description="RECSYS_STAGING_URI: remote jobs' envelopes and outcomes (default LAKE/_jobs)")
    tracking_uri: str = Field("", validation_alias=AliasChoices("tracking_uri", "MLFLOW_TRACKING_URI"),
                              description="MLFLOW_TRACKING_URI (default sqlite under HOME)")
    model_name: str = DEFAULT_REGISTERED_NAME
    window_days: int = Field(365, ge=1)
    top_n: int = Field(100, ge=1)
    device: str = "auto"
    train_config: str | None = None
    gate_mode: str = "enabled"
    gate_config: str | None = None
    profile: Profile = "embedded"
    # Spark (profile spark; the embedded profile's build also runs on this master)
    spark_master: str = "local[2]"
    spark_driver_host: str | None = Field(None, description="the address executors reach the driver at (None: Spark's "
                                                            "choice on a cluster, 127.0.0.1 on a local master)")
    spark_bind_address: str | None = None
    spark_conf: dict[str, str] = Field(default_factory=dict, description="RECSYS_SPARK_CONF: a JSON object of Spark conf")
    spark_conn_id: str = Field("spark_default", description="the Airflow connection spark-submit reads (profile spark)")
    train_processes: int = Field(2, ge=1, description="training processes (one per GPU) with TorchDistributor")
    train_gpu: bool = False

    @field_validator("spark_conf", mode="before")
    @classmethod
    def _conf_json(cls, v: Any) -> Any:
        if isinstance(v, str):
            try:
                v = json.loads(v) if v.strip() else {}
            except ValueError as e:
                raise ValueError(f"RECSYS_SPARK_CONF must be a JSON object of strings ({e})") from e
        if isinstance(v, dict):
            return {str(k): str(x) for k, x in v.items()}
        return v

    @model_validator(mode="after")
    def _defaults_under_home(self) -> Settings:
        home = self.home.expanduser().resolve()
        lake = self.lake_uri or str(home / "lake")
        filled = {"home": home, "events_uri": self.events_uri or str(home / "events"), "lake_uri": lake,
                  "recs_uri": self.recs_uri or str(home / "lake"),
                  "staging_uri": self.staging_uri or f"{lake.rstrip('/')}/_jobs",
                  "tracking_uri": self.tracking_uri or f"sqlite:///{home / 'mlflow.db'}"}  # = pipeline.io.registry's default
        for k, v in filled.items():
            object.__setattr__(self, k, v)  # frozen: filled once, during validation
        return self

    def spark(self) -> SparkConfig:
        """Where the jobs' Spark sessions run (the master, driver address and conf above; executor resources go in
        RECSYS_SPARK_CONF)."""
        return SparkConfig(master=self.spark_master, driver_host=self.spark_driver_host,
                           bind_address=self.spark_bind_address, conf=self.spark_conf)

    @classmethod
    def from_env(cls) -> Settings:
        """The settings from the environment (RECSYS_*, MLFLOW_TRACKING_URI); a bad value is one DataError naming
        the variable."""
        try:
            return cls()
        except SettingsError as e:  # a complex value (RECSYS_SPARK_CONF) that is not JSON
            m = re.search(r'field "(\w+)"', str(e))
            var = f"RECSYS_{m.group(1).upper()}" if m else "a RECSYS_* variable"
            raise DataError(f"{var} is not valid: {e.__cause__ or e}",
                            f"set {var} to a JSON object, e.g. '{{\"spark.executor.memory\": \"4g\"}}', or unset it") from None
        except ValidationError as e:
            first = e.errors()[0]
            name = str(first["loc"][0]) if first.get("loc") else "?"
            var = "MLFLOW_TRACKING_URI" if name == "tracking_uri" else f"RECSYS_{name.upper()}"
            raise DataError(f"{var} is not valid: {first['msg']} (got {redact_text(repr(first.get('input')))})",
                            f"set {var} to a valid value (docs/runbook.md lists the settings) or unset it") from None
