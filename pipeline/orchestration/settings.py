"""Where things live and how the scheduled jobs run: one validated value per RECSYS_* variable (pydantic-settings).

The same DAG code runs in every execution profile; `RECSYS_PROFILE` picks where the heavy steps run:

- ``embedded`` (default): in the Airflow worker's own process (`make run`, the fast tests, one box);
- ``spark``: the matrix build and the inference engine are submitted to the Spark cluster at
  ``RECSYS_SPARK_MASTER`` (standalone, YARN, Kubernetes) with spark-submit, and training is launched onto the
  cluster's workers with TorchDistributor (``RECSYS_TRAIN_PROCESSES`` processes, ``RECSYS_TRAIN_GPU``);
- ``aws``: EMR Serverless for the Spark jobs and a SageMaker training job for training (RECSYS_AWS_* settings,
  pipeline/orchestration/aws/profile.py).

A bad value fails when the settings are read, naming the variable (pydantic's per-field message).

`Settings` is the one class of deployment settings: every variable a deployment sets for the DAGs is a field
(its environment name: `env_names()`). A few RECSYS_* variables are deliberately not fields (`OTHER_VARIABLES`:
where each is read and why); the aws profile's RECSYS_AWS_* variables are its own class, `AwsProfile`, read only in
that profile. README.md's settings table lists all of them with their defaults (`python -m
pipeline.orchestration.settings` prints its rows), and tests/pipeline/orchestration/test_settings_docs.py checks the
table, these classes and the source agree.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from pipeline.errors import DataError
from pipeline.io.redact import redact_text
from pipeline.io.spark import SparkConfig
from pipeline.training import DEFAULT_REGISTERED_NAME

Profile = Literal["embedded", "spark", "aws"]

DERIVED_DEFAULTS = {"home": "~/.recsys", "events_uri": "HOME/events", "lake_uri": "HOME/lake", "recs_uri": "HOME/lake",
                    "staging_uri": "LAKE/_jobs", "tracking_uri": "sqlite:///HOME/mlflow.db",
                    "ledger": "HOME/promotion-ledger.jsonl", "spark_conf": "{}"}

# RECSYS_* variables that are not Settings fields, on purpose: where each is read (its default) and why it is not a
# deployment setting of the DAGs. README.md documents them next to the settings.
OTHER_VARIABLES: dict[str, tuple[str, str]] = {
    "RECSYS_DATA_DIR": ("../shared/data", "the public data sets' folder of `recsys experiment`, the benchmarks and "
                                          "the tests (pipeline/data/dataset.py)"),
    "RECSYS_S3_ENDPOINT": ("AWS_ENDPOINT_URL", "an S3-compatible endpoint (MinIO, moto) for the lake; read by "
                                               "pipeline/io/lake.py in every process, CLI and DAG alike"),
    "RECSYS_S3_CONNECT_TIMEOUT": ("2", "seconds to open an S3 connection (pipeline/io/lake.py)"),
    "RECSYS_S3_REQUEST_TIMEOUT": ("3", "seconds an S3 request may take (pipeline/io/lake.py)"),
    "RECSYS_S3_MAX_ATTEMPTS": ("3", "tries per S3 call, the first included (pipeline/io/lake.py)"),
    "RECSYS_S3_RETRY_AFTER": ("30", "seconds an unreachable S3 endpoint counts as down (pipeline/io/lake.py)"),
    "RECSYS_ARTIFACT_LOCATION": ("HOME/artifacts (local tracking)", "artifact root of the MLflow experiment when "
                                 "recsys creates it (pipeline/io/registry.py)"),
    "RECSYS_ALERT_CALLBACK": ("none", "package.module:function called on every failed task try; read by the failure "
                                      "hook itself, so that a bad setting elsewhere cannot silence the alert "
                                      "(pipeline/orchestration/alerts.py)"),
    "RECSYS_WORKER_THREADS": ("1", "torch threads per Spark inference task, read on the executors "
                                   "(pipeline/serving/spark_engine.py)"),
    "RECSYS_MLFLOW_SECRET_ARN": ("none", "set by the aws profile's operators on the training job and the inference "
                                         "driver from RECSYS_AWS_MLFLOW_SECRET_ARN: the secret the remote entry point "
                                         "reads the MLflow credentials from (pipeline/orchestration/remote.py)"),
    "RECSYS_SPARSE_MM": ("auto", "benchmarks only: force the sparse x dense product's implementation (model/sparse.py)"),
    "RECSYS_HOOK_POINT": ("none", "test hook: the named publish step announces itself and sleeps (pipeline/io/publish.py)"),
    "RECSYS_HOOK_FILE": ("none", "test hook: where that announcement is written"),
    "RECSYS_HOOK_SLEEP": ("60", "test hook: seconds the hooked step sleeps"),
}


class Settings(BaseSettings):
    """The RECSYS_* environment (and MLFLOW_TRACKING_URI), defaults under RECSYS_HOME. Keyword arguments override it."""

    model_config = SettingsConfigDict(env_prefix="RECSYS_", frozen=True, extra="forbid", populate_by_name=True)

    # the defaults shown in README.md are DERIVED_DEFAULTS' for the fields filled in by _defaults_under_home
    home: Path = Field(default_factory=lambda: Path.home() / ".recsys",
                       description="the embedded default's folder: events, lake, MLflow, ledger, Airflow, logs")
    events_uri: str = Field("", description="the events (dt= partitions): a folder or s3:// URI")
    lake_uri: str = Field("", description="the matrix snapshots (LAKE/snapshots/)")
    recs_uri: str = Field("", description="the published recommendations (RECS/recommendations/)")
    staging_uri: str = Field("", description="remote jobs' envelopes and outcomes (profiles spark and aws)")
    # the environment name only (with populate_by_name, `tracking_uri=` still works as a keyword)
    tracking_uri: str = Field("", validation_alias=AliasChoices("MLFLOW_TRACKING_URI"),
                              description="MLflow tracking and registry URI")
    ledger: str = Field("", description="the promotion ledger (JSON lines), a file or s3:// URI")
    model_name: str = Field(DEFAULT_REGISTERED_NAME, description="the MLflow registered model the DAGs train and serve")
    window_days: int = Field(365, ge=1, description="days of events in the weekly matrix build's window")
    top_n: int = Field(100, ge=1, description="items per user in the daily recommendations")
    recs_retention_days: int | None = Field(30, ge=1, description="dates kept in the recommendations table; each "
                                            "publish drops older ones and vacuums (None: keep all)")
    monitor_config: str | None = Field(None, description="MonitorConfig YAML of the daily output rules (None: "
                                       "configs/monitor.yaml's defaults)")
    availability_uri: str | None = Field(None, description="the daily job's availability list: a URI with {date} "
                                         "for the run's date, e.g. s3://lake/availability/dt={date}/ (None: every "
                                         "item available); a missing list fails the run")
    exclusions_uri: str | None = Field(None, description="the daily job's per-user exclusion list (user_id, item_id): "
                                       "a URI with {date} for the run's date, e.g. s3://lake/exclusions/dt={date}/ "
                                       "(None: no exclusions); a missing list fails the run")
    device: str = Field("auto", description="training and scoring device: auto (CUDA when present), cpu or cuda")
    train_config: str | None = Field(None, description="TrainJob YAML for the weekly training (None: TrainJob's defaults)")
    gate_mode: str = Field("enabled", description="enabled (a failing gate fails the run) or dry-run (record only)")
    gate_config: str | None = Field(None, description="GateConfig YAML of the gate thresholds (None: the defaults)")
    candidates_config: str | None = Field(None, description="CandidatesJob YAML (configs/candidates.yaml): the weekly "
                                          "job trains every candidate on the snapshot and promotes the best that "
                                          "passes its gates, in place of RECSYS_TRAIN_CONFIG's one model (profile "
                                          "embedded only)")
    max_model_mb: int | None = Field(None, ge=1, description="the daily job's limit on the model's weights in MiB, "
                                     "checked before they are read (a dense EASE is 4 I^2 bytes; None: a quarter of "
                                     "this machine's memory, at most 32 GiB)")
    profile: Profile = Field("embedded", description="where the heavy steps run: embedded, spark or aws")
    # Spark (profile spark; the embedded profile's build also runs on this master)
    spark_master: str = Field("local[2]", description="Spark master URL (local[N], spark://, yarn, k8s://)")
    spark_driver_host: str | None = Field(None, description="the address executors reach the driver at (None: Spark's "
                                                            "choice on a cluster, 127.0.0.1 on a local master)")
    spark_bind_address: str | None = Field(None, description="the address the driver listens on (None: Spark's choice)")
    spark_driver_memory: str | None = Field(None, description="driver JVM memory, e.g. 4g (None: Spark's default)")
    spark_executor_cores: int | None = Field(None, ge=1, description="cores per executor (None: the cluster's default)")
    spark_executor_memory: str | None = Field(None, description="memory per executor, e.g. 8g (None: Spark's default)")
    spark_executor_instances: int | None = Field(None, ge=1, description="executors (None: Spark's default)")
    spark_conf: dict[str, str] = Field(default_factory=dict, description="a JSON object of any other spark.* settings")
    spark_conn_id: str = Field("spark_default", description="the Airflow connection spark-submit reads (profile spark)")
    train_processes: int = Field(2, ge=1, description="training processes (one per GPU) with TorchDistributor (profile spark)")
    train_gpu: bool = Field(False, description="train on the Spark workers' GPUs (profile spark)")

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

    @field_validator("availability_uri", "exclusions_uri")
    @classmethod
    def _one_date_placeholder(cls, v: str | None, info: ValidationInfo) -> str | None:
        # the only fields filled per run: a stray {name} would fail on every daily run, so refuse it when read
        rest = None if v is None else v.replace("{date}", "")
        if v is not None and rest is not None and (v.count("{date}") != 1 or "{" in rest or "}" in rest):
            raise ValueError(f"RECSYS_{str(info.field_name).upper()} must contain {{date}} exactly once and no other "
                             f"braces (got {v!r})")
        return v

    def availability_for(self, date: Any) -> str | None:
        """The availability list of `date` (YYYY-MM-DD), or None when the deployment sets none."""
        return None if self.availability_uri is None else self.availability_uri.replace("{date}", str(date))

    def exclusions_for(self, date: Any) -> str | None:
        """The exclusion list of `date` (YYYY-MM-DD), or None when the deployment sets none."""
        return None if self.exclusions_uri is None else self.exclusions_uri.replace("{date}", str(date))

    @model_validator(mode="after")
    def _candidates_in_process(self) -> Settings:
        # CandidatesJob trains and gates in one process; the remote profiles stage one TrainJob per weekly run
        if self.candidates_config is not None and self.profile != "embedded":
            raise ValueError(f"RECSYS_CANDIDATES_CONFIG needs RECSYS_PROFILE=embedded (got {self.profile}): the "
                             "spark and aws profiles train one model per week (RECSYS_TRAIN_CONFIG); unset one")
        return self

    @model_validator(mode="after")
    def _defaults_under_home(self) -> Settings:
        home = self.home.expanduser().resolve()
        lake = self.lake_uri or str(home / "lake")
        filled = {"home": home, "events_uri": self.events_uri or str(home / "events"), "lake_uri": lake,
                  "recs_uri": self.recs_uri or str(home / "lake"),
                  "staging_uri": self.staging_uri or f"{lake.rstrip('/')}/_jobs",
                  "tracking_uri": self.tracking_uri or f"sqlite:///{home / 'mlflow.db'}",  # = pipeline.io.registry's default
                  "ledger": self.ledger or str(home / "promotion-ledger.jsonl")}  # = pipeline.training.ledger's default
        for k, v in filled.items():
            object.__setattr__(self, k, v)  # frozen: filled once, during validation
        return self

    def spark(self) -> SparkConfig:
        """Where the jobs' Spark sessions run (the master, driver address and conf above; executor resources go in
        RECSYS_SPARK_CONF)."""
        return SparkConfig(master=self.spark_master, driver_host=self.spark_driver_host,
                           bind_address=self.spark_bind_address, driver_memory=self.spark_driver_memory,
                           executor_cores=self.spark_executor_cores, executor_memory=self.spark_executor_memory,
                           executor_instances=self.spark_executor_instances, conf=self.spark_conf)

    @classmethod
    def env_names(cls) -> dict[str, str]:
        """Each field's environment variable (RECSYS_<FIELD>, or its alias such as MLFLOW_TRACKING_URI)."""
        names = {}
        for name, f in cls.model_fields.items():
            alias = f.validation_alias
            choices = [c for c in alias.choices if isinstance(c, str)] if isinstance(alias, AliasChoices) else []
            names[name] = choices[0] if choices else f"RECSYS_{name.upper()}"
        return names

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
            if not first.get("loc"):  # a rule across settings (a model validator): its message names them
                raise DataError(str(first["msg"]).removeprefix("Value error, "),
                                "change or unset one of the settings it names (docs/runbook.md lists them)") from None
            name = str(first["loc"][0])
            var = cls.env_names().get(name) or (name if name.isupper() else f"RECSYS_{name.upper()}")  # loc: field or alias
            raise DataError(f"{var} is not valid: {first['msg']} (got {redact_text(repr(first.get('input')))})",
                            f"set {var} to a valid value (docs/runbook.md lists the settings) or unset it") from None


# -- the README's tables ------------------------------------------------------------------------------------------

def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if value == "":
        return "(empty)"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def documented_variables() -> dict[str, list[tuple[str, str, str]]]:
    """README.md's settings tables, by section: (variable, default, what) rows from the classes' fields."""
    from pydantic_core import PydanticUndefined

    from pipeline.orchestration.aws.profile import ENV_PREFIX, AwsProfile

    names = Settings.env_names()
    settings = [(names[n], DERIVED_DEFAULTS.get(n) or _shown(f.default), f.description or "")
                for n, f in Settings.model_fields.items()]
    aws = [(ENV_PREFIX + n.upper(), "required" if f.default is PydanticUndefined else _shown(f.default),
            f.description or "see docs/runbook.md, Running on AWS") for n, f in AwsProfile.model_fields.items()]
    other = [(var, default, what) for var, (default, what) in OTHER_VARIABLES.items()]
    return {"Settings": settings, "AwsProfile": aws, "other": other}


def markdown_tables() -> str:
    """The three tables as README.md shows them (`python -m pipeline.orchestration.settings`)."""
    out = []
    for section, rows in documented_variables().items():
        out += [f"<!-- {section} -->", "| variable | default | what |", "|---|---|---|"]
        out += [f"| `{var}` | `{default}` | {what.replace('|', '/')} |" for var, default, what in rows]
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown_tables())
