"""Daily: score every active user for the date → publish atomically. Wiring only: pipeline.orchestration.

Runs every day for the day just over, and also whenever the weekly DAG moves `champion` (the champion asset): that
run re-scores the last complete day with the new model at once.
With no champion yet the run is skipped (nothing to score), not left polling. The infer step runs where
RECSYS_PROFILE says (in the worker, or the Spark engine on a cluster / EMR Serverless) and returns its typed result
as XCom. Idempotent per date (a re-run replaces the date's partition), so catch-up and `make backfill` are safe;
active runs are bounded. A manual run may pass `date`.
"""

from __future__ import annotations

import datetime as dt

from airflow.sdk import AssetOrTimeSchedule, CronDataIntervalTimetable, dag

from pipeline.orchestration.alerts import on_failure
from pipeline.orchestration.topology import CHAMPION_ASSET, DAILY_PARAMS, daily_tasks


@dag(
    dag_id="daily_inference",
    # day D's run starts once D is over (a data interval [D, D+1)); a new champion triggers a run at once
    schedule=AssetOrTimeSchedule(timetable=CronDataIntervalTimetable("0 0 * * *", timezone="UTC"), assets=CHAMPION_ASSET),
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    catchup=True,
    max_active_runs=2,
    default_args={"retries": 2, "retry_delay": dt.timedelta(minutes=2), "retry_exponential_backoff": True,
                  "on_failure_callback": on_failure},
    params=DAILY_PARAMS,
    tags=["recsys", "daily"],
)
def daily_inference():
    daily_tasks()  # tasks call pipeline.orchestration.steps


daily_inference()
