"""Weekly: build the matrix snapshot → train Multi-VAE + PIA → gate and promote. Wiring only: pipeline.orchestration.

The data interval's end is the as-of date (a manual run may pass `as_of`). RECSYS_PROFILE picks where the build and
training run (embedded in the worker, a Spark cluster with TorchDistributor training, or AWS): the task graph is
pipeline.orchestration.topology's. Each step returns its job's typed result as one XCom (small JSON: the snapshot
URI and digest, the registered version, the verdict). A failure at any step stops the run before the gate, and the
gate moves `champion` only for a passing candidate; `champion_moved` then emits the champion asset the daily DAG
listens to.
"""

from __future__ import annotations

import datetime as dt

from airflow.sdk import dag

from pipeline.orchestration.alerts import on_failure
from pipeline.orchestration.topology import WEEKLY_PARAMS, weekly_tasks

RETRIES = {"retries": 2, "retry_delay": dt.timedelta(minutes=5), "retry_exponential_backoff": True,
           "on_failure_callback": on_failure}


@dag(
    dag_id="weekly_train",
    schedule="@weekly",
    start_date=dt.datetime(2026, 1, 4, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    default_args=RETRIES,
    params=WEEKLY_PARAMS,
    tags=["recsys", "weekly"],
)
def weekly_train():
    weekly_tasks()  # tasks call pipeline.orchestration.steps


weekly_train()
