"""The weekly and daily task graphs, for the execution profile in RECSYS_PROFILE (pipeline/orchestration/settings.py).

The DAG files call `weekly_tasks()` / `daily_tasks()` inside their `@dag`; this module decides what each heavy step
becomes:

- ``embedded``: one task that runs the typed job in the worker (`steps.build_matrix`, `steps.train`, `steps.infer`);
- ``spark`` / ``aws``: three tasks: ``<step>_stage`` writes the job's envelope (pipeline/orchestration/remote.py),
  ``<step>_run`` runs it on the engine (spark-submit to the cluster; EMR Serverless or a SageMaker training job,
  deferrable), and ``<step>`` collects the typed result. The collect task keeps the embedded task's id and XCom, so
  every downstream task (and every reader of XCom) is the same in all profiles.

Both DAGs share: Params for manual runs (an as-of or a date; empty = the schedule's), the failure hook
(pipeline/orchestration/alerts.py), and two Assets: the weekly snapshot (emitted by the build) and the champion
(emitted only when the gate moved it), which triggers the daily DAG besides its daily schedule, so a new champion
serves at once instead of a sensor polling the registry.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from airflow.sdk import Asset, Param, get_current_context, task

from pipeline.orchestration.settings import Settings

SNAPSHOT_ASSET = Asset(name="recsys_snapshot", uri="recsys://lake/snapshots")
CHAMPION_ASSET = Asset(name="recsys_champion", uri="recsys://registry/champion")

WEEKLY_PARAMS = {"as_of": Param(None, type=["null", "string"], format="date",
                                description="build the window ending at this date (YYYY-MM-DD); empty: the interval's last day")}
DAILY_PARAMS = {"date": Param(None, type=["null", "string"], format="date",
                              description="score for this date (YYYY-MM-DD); empty: the run's logical date")}


def _context_key(step: str) -> tuple[str, str, str]:
    ctx = get_current_context()
    return str(ctx["dag"].dag_id), str(ctx["run_id"]), step


def _run_date(ctx: Any, param: str, interval_end: bool) -> dt.date:
    """A manual run's Param, else the schedule's day: the weekly data interval's last day, the daily interval's day.
    A run an asset triggered has neither (Airflow 3): the last complete day before it started."""
    given = (ctx.get("params") or {}).get(param)
    if given:
        return dt.date.fromisoformat(str(given))
    if interval_end and ctx.get("data_interval_end") is not None:
        return (ctx["data_interval_end"] - dt.timedelta(days=1)).date()
    if not interval_end and ctx.get("logical_date") is not None:
        return ctx["logical_date"].date()
    return (ctx["dag_run"].run_after - dt.timedelta(days=1)).date()


def _engine_operator(step: str, settings: Settings, envelope_uri: Any, timeout: dt.timedelta) -> Any:
    """The operator that runs the staged envelope where the profile says."""
    if settings.profile == "spark":
        from pipeline.orchestration.spark_submit import spark_submit_operator

        return spark_submit_operator(f"{step}_run", envelope_uri, settings, execution_timeout=timeout)
    from pipeline.orchestration import aws

    profile = aws.AwsProfile.from_env()
    if step == "train":
        return aws.training_job(f"{step}_run", envelope_uri, profile, execution_timeout=timeout)
    kind: Literal["build_matrix", "infer"] = "infer" if step == "infer" else "build_matrix"
    return aws.emr_serverless_job(f"{step}_run", envelope_uri, profile, kind=kind, execution_timeout=timeout)


def _remote(step: str, stage_task: Any, timeout: dt.timedelta, settings: Settings, **collect_kw: Any) -> Any:
    """stage → run on the engine → collect (task id `step`, the typed result as XCom)."""
    envelope_uri = stage_task
    run = _engine_operator(step, settings, envelope_uri, timeout)

    @task(task_id=step, multiple_outputs=False, **collect_kw)
    def collect(uri: str) -> dict[str, Any]:
        from pipeline.orchestration.steps import collect

        return collect(uri).to_xcom()

    result = collect(envelope_uri)
    run >> result
    return result


def weekly_tasks() -> None:
    """build_matrix → train → gate_and_promote → champion_moved, each heavy step where RECSYS_PROFILE says; with
    RECSYS_CANDIDATES_CONFIG (embedded), build_matrix → train_candidates (train, gate, promote) → champion_moved."""
    settings = Settings.from_env()

    @task(execution_timeout=dt.timedelta(minutes=5), retries=0, outlets=[CHAMPION_ASSET])
    def champion_moved(verdict: dict[str, Any]) -> str:
        """Emits the champion asset (which triggers the daily DAG) only when the gate moved `champion`."""
        from airflow.exceptions import AirflowSkipException

        if not verdict.get("promoted"):
            raise AirflowSkipException(f"champion unchanged (version {verdict.get('version')} not promoted)")
        return str(verdict["version"])

    if settings.profile == "embedded":
        @task(execution_timeout=dt.timedelta(hours=2), multiple_outputs=False, outlets=[SNAPSHOT_ASSET])
        def build_matrix() -> dict[str, Any]:
            from pipeline.orchestration.steps import Settings, build_matrix

            return build_matrix(Settings.from_env(), _run_date(get_current_context(), "as_of", True)).to_xcom()

        # production: this task goes to the GPU pool/queue (see docs/runbook.md); locally it runs in-process
        @task(execution_timeout=dt.timedelta(hours=6), pool="default_pool", multiple_outputs=False)
        def train(build: dict[str, Any]) -> dict[str, Any]:
            from pipeline.orchestration.steps import Settings, train

            return train(Settings.from_env(), build).to_xcom()

        if settings.candidates_config is not None:  # champion/challenger: one task trains, gates and promotes
            @task(execution_timeout=dt.timedelta(hours=12), retries=0, multiple_outputs=False)
            def train_candidates(build: dict[str, Any]) -> dict[str, Any]:
                from pipeline.orchestration.steps import Settings, train_candidates

                r = train_candidates(Settings.from_env(), build)
                return {"promoted": r.promoted is not None, "version": r.promoted, "candidates": r.to_xcom()}

            champion_moved(train_candidates(build_matrix()))  # type: ignore[arg-type]
            return
        trained = train(build_matrix())  # type: ignore[arg-type]  # an XComArg stands for the dict at parse time
    else:
        @task(task_id="build_matrix_stage")
        def stage_build() -> str:
            from pipeline.orchestration.steps import Settings, build_matrix_job, stage

            s = Settings.from_env()
            return stage(s, build_matrix_job(s, _run_date(get_current_context(), "as_of", True)), *_context_key("build_matrix"))

        built = _remote("build_matrix", stage_build(), dt.timedelta(hours=2), settings, outlets=[SNAPSHOT_ASSET])

        @task(task_id="train_stage")
        def stage_train(build: dict[str, Any]) -> str:
            from pipeline.orchestration.steps import Settings, stage, train_job

            s = Settings.from_env()
            return stage(s, train_job(s, build), *_context_key("train"))

        trained = _remote("train", stage_train(built), dt.timedelta(hours=6), settings)

    @task(execution_timeout=dt.timedelta(hours=1), retries=0, multiple_outputs=False)
    def gate_and_promote(trained: dict[str, Any]) -> dict[str, Any]:
        from pipeline.orchestration.steps import Settings, gate

        return gate(Settings.from_env(), trained).to_xcom()

    champion_moved(gate_and_promote(trained))  # type: ignore[arg-type]


def daily_tasks() -> None:
    """champion_exists → infer (where RECSYS_PROFILE says). No champion yet: the run is skipped, not polled; the
    first promotion triggers a run through the champion asset."""
    settings = Settings.from_env()

    @task.short_circuit(execution_timeout=dt.timedelta(minutes=10))
    def champion_exists() -> bool:
        from pipeline.orchestration.steps import Settings, champion_version

        return champion_version(Settings.from_env()) is not None

    gate = champion_exists()
    if settings.profile == "embedded":
        @task(execution_timeout=dt.timedelta(hours=2), multiple_outputs=False)
        def infer() -> dict[str, Any]:
            from pipeline.orchestration.steps import Settings, infer

            return infer(Settings.from_env(), _run_date(get_current_context(), "date", False)).to_xcom()

        gate >> infer()
    else:
        @task(task_id="infer_stage")
        def stage_infer() -> str:
            from pipeline.orchestration.steps import Settings, infer_job, stage

            s = Settings.from_env()
            return stage(s, infer_job(s, _run_date(get_current_context(), "date", False)), *_context_key("infer"))

        staged = stage_infer()
        gate >> staged
        _remote("infer", staged, dt.timedelta(hours=2), settings)
