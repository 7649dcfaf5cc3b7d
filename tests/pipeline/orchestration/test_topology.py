"""pipeline.orchestration.topology: which day a run works on (a manual Param, the schedule's interval, or, for a run a
new champion triggered, the last complete day). The graphs themselves are checked through Airflow's DagBag in
tests/dags/test_dag_structure.py and run in tests/dags/test_dag_runs*.py."""

from __future__ import annotations

import datetime as dt
from types import SimpleNamespace

from pipeline.orchestration.topology import _run_date

UTC = dt.UTC


def test_a_manual_param_wins() -> None:
    ctx = {"params": {"as_of": "2026-02-01"}, "data_interval_end": dt.datetime(2026, 1, 18, tzinfo=UTC)}
    assert _run_date(ctx, "as_of", True) == dt.date(2026, 2, 1)


def test_weekly_builds_up_to_the_interval_s_last_day() -> None:
    ctx = {"params": {"as_of": None}, "data_interval_end": dt.datetime(2026, 1, 18, tzinfo=UTC)}
    assert _run_date(ctx, "as_of", True) == dt.date(2026, 1, 17)


def test_daily_scores_its_interval_s_day() -> None:
    ctx = {"params": {}, "logical_date": dt.datetime(2026, 1, 17, tzinfo=UTC),
           "data_interval_end": dt.datetime(2026, 1, 18, tzinfo=UTC)}
    assert _run_date(ctx, "date", False) == dt.date(2026, 1, 17)


def test_a_run_triggered_by_a_new_champion_rescoring_the_last_complete_day() -> None:
    ctx = {"params": {}, "logical_date": None, "dag_run": SimpleNamespace(run_after=dt.datetime(2026, 1, 20, 10, 30, tzinfo=UTC))}
    assert _run_date(ctx, "date", False) == dt.date(2026, 1, 19)
