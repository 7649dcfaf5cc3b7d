"""Profile `spark`: a staged job submitted to the Spark cluster with the Airflow Spark provider's spark-submit.

The application is pipeline/orchestration/remote.py, its one argument the envelope's URI. The master comes from
the Airflow connection RECSYS_SPARK_CONN_ID (default ``spark_default``: host ``spark://HOST``, port, or ``yarn`` /
``k8s://...``), the rest from the settings: RECSYS_SPARK_CONF (executor cores and memory, any Spark conf), the
driver host and bind address executors reach the driver at (RECSYS_SPARK_DRIVER_HOST / _BIND_ADDRESS; loopback
only where the whole cluster is on this machine). The driver runs in client mode on the Airflow worker (Spark
standalone runs Python applications in client mode only); the executors do the work and write the tables.

A failed application fails the task with the remote job's own one-line message (its outcome), not spark-submit's
exit code.
"""

from __future__ import annotations

import datetime as dt
import sys
from typing import Any

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

from pipeline.orchestration import remote
from pipeline.orchestration.settings import Settings


class RemoteSparkSubmit(SparkSubmitOperator):
    """spark-submit of remote.py on one envelope; a failure is re-raised as the remote job's message."""

    def execute(self, context: Any) -> Any:
        try:
            return super().execute(context)
        except Exception as e:
            explained = remote.explain_failure(str((self.application_args or [""])[0]), e)
            if explained is e:
                raise
            raise explained from e


def spark_conf(settings: Settings) -> dict[str, str]:
    """The Spark conf every submitted job gets: the settings' conf, driver host/bind address, UTC, no UI port clash."""
    conf = {"spark.sql.session.timeZone": "UTC", "spark.ui.enabled": "false",
            "spark.pyspark.python": sys.executable, "spark.pyspark.driver.python": sys.executable}
    if settings.spark_driver_host:
        conf["spark.driver.host"] = settings.spark_driver_host
    if settings.spark_bind_address:
        conf["spark.driver.bindAddress"] = settings.spark_bind_address
    return conf | dict(settings.spark_conf)  # the operator's own settings win


def spark_submit_operator(task_id: str, envelope_uri: Any, settings: Settings, *,
                          execution_timeout: dt.timedelta) -> RemoteSparkSubmit:
    """The run task of a staged step (envelope_uri: the stage task's XComArg)."""
    return RemoteSparkSubmit(
        task_id=task_id, application=str(remote.ENTRY_POINT), application_args=[envelope_uri],
        conn_id=settings.spark_conn_id, conf=spark_conf(settings), name=f"recsys-{task_id}",
        env_vars={"PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable},
        execution_timeout=execution_timeout)
