"""Daily: wait for a champion → score every active user for the logical date → publish atomically.

Wiring only: pipeline.orchestration.steps. The infer task returns the typed result as XCom (partition URI, users,
model version). Idempotent per date (re-running replaces the date's partition), so catch-up and `make backfill` are
safe; active runs are bounded.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from airflow.sdk import dag, task


@dag(
    dag_id="daily_inference",
    schedule="@daily",
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    catchup=True,
    max_active_runs=2,
    default_args={"retries": 2, "retry_delay": dt.timedelta(minutes=2), "retry_exponential_backoff": True},
    tags=["recsys", "daily"],
)
def daily_inference():
    @task.sensor(poke_interval=60, timeout=6 * 3600, mode="reschedule")
    def champion_exists() -> bool:
        from pipeline.orchestration.steps import Settings, champion_version

        return champion_version(Settings.from_env()) is not None

    @task(execution_timeout=dt.timedelta(hours=2), multiple_outputs=False)
    def infer(ds=None) -> dict[str, Any]:
        from pipeline.orchestration.steps import Settings, infer

        return infer(Settings.from_env(), ds).to_xcom()

    champion_exists() >> infer()


daily_inference()
