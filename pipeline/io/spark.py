"""The one way jobs get a Spark session: the active one when there is one (tests, notebooks, a cluster's
driver), else a new one configured the same way for every job.

Every session a job uses computes in UTC (`spark.sql.session.timeZone`), whatever the machine's or the JVM's
zone: dates and day cut-offs in the lake are UTC days, and Spark otherwise converts between timestamps and
wall-clock strings in the JVM's default zone. A local master (`local`, `local[N]`, `local[*]`) is bound to
loopback (driver host, bind address and SPARK_LOCAL_IP), so a test or a laptop run never listens on the network;
a cluster master keeps Spark's own choice. pyspark is imported lazily: importing this module costs nothing.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

SESSION_TIME_ZONE = "UTC"
LOOPBACK = "127.0.0.1"


def is_local_master(master: str) -> bool:
    """Whether `master` runs Spark in this process's machine only: `local`, `local[N]`, `local[*]`, `local[N,F]`."""
    return master == "local" or master.startswith("local[")


def spark_session(master: str, app_name: str, shuffle_partitions: int | None = None,
                  driver_memory: str | None = None) -> SparkSession:
    """The active session, or a new one on `master` named `app_name`; either way with the UTC session time zone
    and, when given, `shuffle_partitions` (both are runtime settings, so they are applied to an active session
    too). `driver_memory` only applies when this call starts the JVM (a running driver's heap is fixed).

    A new session: PYSPARK_PYTHON (and PYSPARK_DRIVER_PYTHON) default to this interpreter, the UI is off, and a
    local master is bound to 127.0.0.1 (SPARK_LOCAL_IP too, unless set).
    """
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        active.conf.set("spark.sql.session.timeZone", SESSION_TIME_ZONE)
        if shuffle_partitions is not None:
            active.conf.set("spark.sql.shuffle.partitions", str(shuffle_partitions))
        return active
    local = is_local_master(master)
    if local:
        os.environ.setdefault("SPARK_LOCAL_IP", LOOPBACK)
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = (SparkSession.builder.master(master).appName(app_name)
               .config("spark.ui.enabled", "false").config("spark.sql.session.timeZone", SESSION_TIME_ZONE))
    if local:
        builder = builder.config("spark.driver.host", LOOPBACK).config("spark.driver.bindAddress", LOOPBACK)
    if driver_memory is not None:
        builder = builder.config("spark.driver.memory", driver_memory)
    if shuffle_partitions is not None:
        builder = builder.config("spark.sql.shuffle.partitions", str(shuffle_partitions))
    return builder.getOrCreate()
