"""The DAG files import cleanly through Airflow's own DagBag, in every execution profile, with the wiring the runbook
describes: the same DAG code gives one task per heavy step in the embedded profile and stage → run → collect on an
engine in the others; the assets, Params and the failure hook are on every DAG."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

DAGS = Path(__file__).resolve().parents[2] / "dags"


def _dagbag():
    try:
        from airflow.dag_processing.dagbag import DagBag
    except ImportError:  # older layout
        from airflow.models.dagbag import DagBag  # type: ignore[no-redef]
    return DagBag(dag_folder=str(DAGS))


@pytest.fixture(scope="module")
def airflow_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ.setdefault("AIRFLOW_HOME", str(tmp_path_factory.mktemp("airflow")))
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")


@pytest.fixture(scope="module")
def dagbag(airflow_home: None):
    return _dagbag()


def _chain(dag) -> list[str]:
    return [t.task_id for t in dag.topological_sort()]


def test_dagbag_has_both_dags_and_no_import_errors(dagbag) -> None:
    assert dagbag.import_errors == {}
    assert {"weekly_train", "daily_inference"} <= set(dagbag.dag_ids)


def test_weekly_chain_and_policies(dagbag) -> None:
    dag = dagbag.dags["weekly_train"]
    assert _chain(dag) == ["build_matrix", "train", "gate_and_promote", "champion_moved"]
    assert dag.max_active_runs == 1 and not dag.catchup
    assert all(t.execution_timeout is not None for t in dag.tasks)
    assert dag.get_task("build_matrix").retries == 2 and dag.get_task("gate_and_promote").retries == 0
    assert [a.name for a in dag.get_task("build_matrix").outlets] == ["recsys_snapshot"]
    assert [a.name for a in dag.get_task("champion_moved").outlets] == ["recsys_champion"]
    assert "as_of" in dag.params


def test_daily_runs_on_schedule_or_a_new_champion_then_infers(dagbag) -> None:
    from airflow.sdk import AssetOrTimeSchedule

    dag = dagbag.dags["daily_inference"]
    assert _chain(dag) == ["champion_exists", "infer"]
    assert dag.catchup and dag.max_active_runs == 2
    assert isinstance(dag.timetable, AssetOrTimeSchedule)
    assert "recsys_champion" in str(dag.timetable.asset_condition)
    assert "date" in dag.params


def test_every_task_carries_the_failure_hook(dagbag) -> None:
    from pipeline.orchestration.alerts import on_failure

    for dag_id in ("weekly_train", "daily_inference"):
        for t in dagbag.dags[dag_id].tasks:
            hooks = t.on_failure_callback if isinstance(t.on_failure_callback, list) else [t.on_failure_callback]
            assert on_failure in hooks, (dag_id, t.task_id)


def test_spark_profile_submits_each_heavy_step_to_the_cluster(airflow_home: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.orchestration import remote
    from pipeline.orchestration.spark_submit import RemoteSparkSubmit

    monkeypatch.setenv("RECSYS_PROFILE", "spark")
    monkeypatch.setenv("RECSYS_SPARK_CONF", '{"spark.executor.memory": "1g"}')
    monkeypatch.setenv("RECSYS_SPARK_DRIVER_HOST", "10.0.0.5")
    bag = _dagbag()
    assert bag.import_errors == {}
    weekly = bag.dags["weekly_train"]
    assert _chain(weekly) == ["build_matrix_stage", "build_matrix_run", "build_matrix", "train_stage", "train_run", "train",
                              "gate_and_promote", "champion_moved"]
    run = weekly.get_task("build_matrix_run")
    assert isinstance(run, RemoteSparkSubmit)
    assert run.application == str(remote.ENTRY_POINT)
    assert run.conf["spark.executor.memory"] == "1g" and run.conf["spark.driver.host"] == "10.0.0.5"
    assert [a.name for a in weekly.get_task("build_matrix").outlets] == ["recsys_snapshot"]
    assert _chain(bag.dags["daily_inference"]) == ["champion_exists", "infer_stage", "infer_run", "infer"]


def test_candidates_make_one_task_that_trains_gates_and_promotes(airflow_home: None, monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    monkeypatch.setenv("RECSYS_CANDIDATES_CONFIG", str(tmp_path / "candidates.yaml"))
    bag = _dagbag()
    assert bag.import_errors == {}
    weekly = bag.dags["weekly_train"]
    assert _chain(weekly) == ["build_matrix", "train_candidates", "champion_moved"]
    assert weekly.get_task("train_candidates").retries == 0  # a retry would train every candidate again
    assert [a.name for a in weekly.get_task("champion_moved").outlets] == ["recsys_champion"]
    monkeypatch.setenv("RECSYS_PROFILE", "spark")  # remote profiles stage one TrainJob: refused, naming both
    errors = _dagbag().import_errors
    assert len(errors) == 2 and all("RECSYS_CANDIDATES_CONFIG needs RECSYS_PROFILE=embedded" in e for e in errors.values())


def test_a_bad_profile_is_an_import_error_naming_the_variable(airflow_home: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_PROFILE", "gpu-farm")
    bag = _dagbag()
    assert len(bag.import_errors) == 2
    assert all("RECSYS_PROFILE" in e and "Fix:" in e for e in bag.import_errors.values())


def test_dag_files_hold_wiring_only() -> None:
    for f in DAGS.glob("*.py"):
        text = f.read_text()
        assert "import torch" not in text and "pyspark" not in text and "mlflow" not in text, f.name
        assert "from pipeline.orchestration.topology import" in text, f.name
        assert "@task" not in text, f.name  # tasks are built by pipeline.orchestration.topology
