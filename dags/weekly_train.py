"""Weekly: build the matrix snapshot → train Multi-VAE + PIA → gate and promote. Wiring only: pipeline.orchestration.steps.

The data interval's end is the as-of date. Each task returns its job's typed result as one XCom (small JSON: the snapshot
URI and digest, the registered version, the verdict), which the next task reads. A failure at any step stops the run
before the gate, and the gate moves `champion` only for a passing candidate, so `champion` is unchanged by any failed
run.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from airflow.sdk import dag, task

RETRIES = {"retries": 2, "retry_delay": dt.timedelta(minutes=5), "retry_exponential_backoff": True}


@dag(
    dag_id="weekly_train",
    schedule="@weekly",
    start_date=dt.datetime(2026, 1, 4, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    default_args=RETRIES,
    tags=["recsys", "weekly"],
)
def weekly_train():
    @task(execution_timeout=dt.timedelta(hours=2), multiple_outputs=False)
    def build_matrix(data_interval_end=None) -> dict[str, Any]:
        from pipeline.orchestration.steps import Settings, build_matrix

        return build_matrix(Settings.from_env(), (data_interval_end - dt.timedelta(days=1)).date()).to_xcom()

    # production: this task goes to the GPU pool/queue (see docs/runbook.md); locally it runs in-process
    @task(execution_timeout=dt.timedelta(hours=6), pool="default_pool", multiple_outputs=False)
    def train(build: dict[str, Any]) -> dict[str, Any]:
        from pipeline.orchestration.steps import Settings, train

        return train(Settings.from_env(), build).to_xcom()

    @task(execution_timeout=dt.timedelta(hours=1), retries=0, multiple_outputs=False)
    def gate_and_promote(trained: dict[str, Any]) -> dict[str, Any]:
        from pipeline.orchestration.steps import Settings, gate

        return gate(Settings.from_env(), trained).to_xcom()

    gate_and_promote(train(build_matrix()))


weekly_train()
