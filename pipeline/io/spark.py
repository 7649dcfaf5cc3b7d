"""The one way jobs get a Spark session: the active one when there is one (tests, notebooks, a cluster's
driver), else a new one configured from a `SparkConfig`, the same way for every job.

Where Spark runs is configuration, never code: `SparkConfig.master` is a master URL (`local[N]` for the embedded
profile, `spark://HOST:PORT` for a standalone cluster, `yarn`, `k8s://...`), and the driver's advertised host,
bind address, executor resources and any other Spark setting come with it. Loopback is only the default of a
local master: a test or a laptop run never listens on the network, while a cluster master keeps Spark's own
choice unless `driver_host` / `bind_address` say otherwise.

Every session a job uses computes in UTC (`spark.sql.session.timeZone`), whatever the machine's or the JVM's
zone: dates and day cut-offs in the lake are UTC days, and Spark otherwise converts between timestamps and
wall-clock strings in the JVM's default zone. A standalone master is probed with a TCP connect before Spark
starts, so an unreachable cluster is one DataError in seconds rather than a minute of Spark's registration
retries. pyspark is imported lazily: importing this module costs nothing.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline.errors import DataError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

SESSION_TIME_ZONE = "UTC"
LOOPBACK = "127.0.0.1"
MASTER_FORMS = "local, local[N], local[*], spark://HOST:PORT, yarn, k8s://https://HOST:PORT or sc://HOST:PORT"

_HOST_PORT = r"[A-Za-z0-9]([A-Za-z0-9.\-]*[A-Za-z0-9])?:\d{1,5}"
_MASTER = re.compile(
    r"^(local(\[(\d+|\*)(,\d+)?\])?"  # local, local[N], local[*], local[N,F]
    rf"|spark://{_HOST_PORT}(,{_HOST_PORT})*"  # standalone, HA masters comma-separated
    r"|yarn"
    r"|k8s://(https?://)?[A-Za-z0-9]([A-Za-z0-9.\-]*[A-Za-z0-9])?(:\d{1,5})?"
    r"|sc://[A-Za-z0-9]([A-Za-z0-9.\-]*[A-Za-z0-9])?(:\d{1,5})?(/;[^\s]*)?)$")  # Spark Connect
_MEMORY = re.compile(r"^\d+[kmgtKMGT]?$")
# S3 settings pipeline.io.lake reads; shipped to a local master's Python workers (see executor_env)
_LAKE_ENV = ("AWS_ENDPOINT_URL", "RECSYS_S3_ENDPOINT", "AWS_REGION", "AWS_DEFAULT_REGION", "RECSYS_S3_CONNECT_TIMEOUT",
             "RECSYS_S3_REQUEST_TIMEOUT", "RECSYS_S3_MAX_ATTEMPTS", "RECSYS_S3_RETRY_AFTER",
             "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


def is_local_master(master: str) -> bool:
    """Whether `master` runs Spark in this process's machine only: `local`, `local[N]`, `local[*]`, `local[N,F]`."""
    return master == "local" or master.startswith("local[")


def check_master(master: str) -> str:
    """`master` when it is a Spark master URL (MASTER_FORMS), else a DataError naming it."""
    if not isinstance(master, str) or not _MASTER.match(master):
        raise DataError(f"Spark master {str(master)[:120]!r} is not a master URL",
                        f"use {MASTER_FORMS} (--spark-master / RECSYS_SPARK_MASTER)")
    return master


class SparkConfig(BaseModel):
    """Where and how a job's Spark session runs. Only `master` is needed; the rest default to Spark's own choice
    (loopback for a local master). `conf` is passed to Spark as is (kept out of manifests and reprs: it may hold
    secrets such as spark.hadoop.fs.s3a.* keys)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    master: str = "local[*]"
    driver_host: str | None = None  # the address executors reach the driver at (spark.driver.host)
    bind_address: str | None = None  # the address the driver listens on (spark.driver.bindAddress)
    driver_memory: str | None = None  # only when this process starts the JVM
    executor_cores: int | None = Field(None, ge=1)
    executor_memory: str | None = None
    executor_instances: int | None = Field(None, ge=1)
    connect_timeout_s: float = Field(5.0, gt=0, le=300)  # the TCP probe of a spark:// master
    conf: dict[str, str] = Field(default_factory=dict, repr=False)

    @field_validator("master")
    @classmethod
    def _master(cls, v: str) -> str:
        return check_master(v)

    @field_validator("driver_memory", "executor_memory")
    @classmethod
    def _memory(cls, v: str | None) -> str | None:
        if v is not None and not _MEMORY.match(v):
            raise ValueError(f"{v!r} is not a JVM memory size (e.g. 512m, 4g)")
        return v

    @field_validator("driver_host", "bind_address")
    @classmethod
    def _host(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^[A-Za-z0-9]([A-Za-z0-9.\-:]*[A-Za-z0-9])?$", v):
            raise ValueError(f"{v!r} is not a host name or IP address")
        return v

    @field_validator("conf")
    @classmethod
    def _conf(cls, v: dict[str, str]) -> dict[str, str]:
        bad = [k for k in v if not k.startswith("spark.")]
        if bad:
            raise ValueError(f"Spark settings start with 'spark.' (got {', '.join(sorted(bad)[:3])})")
        return v

    @classmethod
    def from_env(cls, default_master: str = "local[*]") -> SparkConfig:
        """From RECSYS_SPARK_MASTER, RECSYS_SPARK_DRIVER_HOST, RECSYS_SPARK_BIND_ADDRESS, RECSYS_SPARK_DRIVER_MEMORY,
        RECSYS_SPARK_EXECUTOR_CORES / _MEMORY / _INSTANCES and RECSYS_SPARK_CONF (a JSON object of spark.* settings);
        a bad value is one DataError naming the variable."""
        import json

        from pydantic import ValidationError

        env = os.environ.get
        fields: dict[str, object] = {"master": env("RECSYS_SPARK_MASTER") or default_master}
        for name in ("driver_host", "bind_address", "driver_memory", "executor_cores", "executor_memory",
                     "executor_instances"):
            value = env(f"RECSYS_SPARK_{name.upper()}")
            if value:
                fields[name] = value
        raw = env("RECSYS_SPARK_CONF")
        if raw:
            try:
                fields["conf"] = json.loads(raw)
            except ValueError as e:
                raise DataError(f"RECSYS_SPARK_CONF is not JSON ({e})",
                                'set it to a JSON object of Spark settings, e.g. {"spark.executor.cores": "2"}') from e
        try:
            return cls.model_validate(fields)
        except ValidationError as e:
            err = e.errors()[0]
            where = err["loc"][0] if err["loc"] else "master"
            var = "RECSYS_SPARK_CONF" if where == "conf" else f"RECSYS_SPARK_{str(where).upper()}"
            ctx = err.get("ctx", {}).get("error")
            if isinstance(ctx, DataError):
                raise ctx from None
            raise DataError(f"{var}: {err['msg']}", f"fix {var} in the environment") from None

    @property
    def local(self) -> bool:
        return is_local_master(self.master)

    def settings(self) -> dict[str, str]:
        """The Spark settings this config sets on a new session (before `conf`, which wins)."""
        out = {"spark.ui.enabled": "false", "spark.sql.session.timeZone": SESSION_TIME_ZONE}
        host = self.driver_host or (LOOPBACK if self.local else None)
        bind = self.bind_address or (LOOPBACK if self.local else None)
        for key, value in (("spark.driver.host", host), ("spark.driver.bindAddress", bind),
                           ("spark.driver.memory", self.driver_memory), ("spark.executor.memory", self.executor_memory),
                           ("spark.executor.cores", self.executor_cores),
                           ("spark.executor.instances", self.executor_instances)):
            if value is not None:
                out[key] = str(value)
        return {**out, **self.conf}


def probe_master(cfg: SparkConfig) -> None:
    """A DataError naming the master when no `spark://` master of it accepts a TCP connection within
    cfg.connect_timeout_s (Spark itself would retry its registration for about a minute, then give up)."""
    if not cfg.master.startswith("spark://"):
        return
    errors = []
    for hp in cfg.master[len("spark://"):].split(","):
        host, _, port = hp.rpartition(":")
        try:
            with socket.create_connection((host, int(port)), timeout=cfg.connect_timeout_s):
                return
        except OSError as e:
            errors.append(f"{hp}: {e.strerror or type(e).__name__}")
    raise DataError(f"Spark master {cfg.master} is unreachable ({'; '.join(errors)})",
                    "start the cluster's master (and workers), or point --spark-master / RECSYS_SPARK_MASTER at a "
                    "running one; use local[N] to run in this process")


def executor_env(cfg_or_master: SparkConfig | str) -> dict[str, str]:
    """The lake's S3 settings (endpoint, region, timeouts, credentials) to apply in a local master's Python workers:
    they are children of this process's JVM and inherit its environment as it was when the JVM started, not as it
    is now. On a cluster the executors use their own environment (their role, or spark.executorEnv.* in `conf`),
    so nothing is shipped."""
    master = cfg_or_master.master if isinstance(cfg_or_master, SparkConfig) else cfg_or_master
    if not is_local_master(master):
        return {}
    return {k: os.environ[k] for k in _LAKE_ENV if k in os.environ}


def apply_env(env: dict[str, str]) -> None:
    """In a Python worker: take the driver's lake settings shipped by `executor_env`."""
    os.environ.update(env)


def active_master() -> str | None:
    """The master of this process's active session, or None without one."""
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    return None if active is None else active.sparkContext.master


def spark_session(cfg: SparkConfig | str, app_name: str, shuffle_partitions: int | None = None,
                  driver_memory: str | None = None) -> SparkSession:
    """The active session, or a new one on `cfg` (a SparkConfig, or just a master URL) named `app_name`; either
    way with the UTC session time zone and, when given, `shuffle_partitions` (both are runtime settings, so they are
    applied to an active session too). `driver_memory` (or cfg.driver_memory, which wins) only applies when this
    call starts the JVM (a running driver's heap is fixed).

    An active session on another master is reused when `cfg` asks for a local one (tests, notebooks); asking for a
    cluster while this process runs a session elsewhere is a DataError (one SparkContext per process).
    A new session: PYSPARK_PYTHON (and PYSPARK_DRIVER_PYTHON) default to this interpreter, the UI is off, and a
    local master is bound to 127.0.0.1 (SPARK_LOCAL_IP too, unless set).
    """
    from pyspark.sql import SparkSession

    if isinstance(cfg, str):
        cfg = SparkConfig(master=cfg)
    probe_master(cfg)  # first: "unreachable" is the cause to name, whatever else runs in this process
    active = SparkSession.getActiveSession()
    if active is not None:
        running = active.sparkContext.master
        if not cfg.local and running != cfg.master:
            raise DataError(f"this process already runs a Spark session on {running}, so the job cannot run on "
                            f"{cfg.master}", "run the job in its own process (one SparkContext per process), or stop "
                            "the other session first")
        active.conf.set("spark.sql.session.timeZone", SESSION_TIME_ZONE)
        if shuffle_partitions is not None:
            active.conf.set("spark.sql.shuffle.partitions", str(shuffle_partitions))
        return active
    if cfg.master.startswith("sc://"):
        raise DataError(f"Spark master {cfg.master} is a Spark Connect server: these jobs use the classic API "
                        "(broadcast variables, the SparkContext)", "use spark://HOST:PORT, yarn or k8s://... instead")
    if cfg.local:
        os.environ.setdefault("SPARK_LOCAL_IP", LOOPBACK)
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    settings = cfg.settings()
    if driver_memory is not None and cfg.driver_memory is None:
        settings["spark.driver.memory"] = driver_memory
    if shuffle_partitions is not None:
        settings["spark.sql.shuffle.partitions"] = str(shuffle_partitions)
    builder = SparkSession.builder.master(cfg.master).appName(app_name)
    for key, value in settings.items():
        builder = builder.config(key, value)
    return builder.getOrCreate()
