"""Both DAGs run for real through Airflow's own runner (`airflow dags test`, i.e. `dag.test()`) on the embedded default.

Each run is a subprocess with the environment of pipeline.orchestration.dev.local_airflow.airflow_env (a migrated
SQLite Airflow DB in a temp AIRFLOW_HOME), so no Airflow import or configuration leaks into (or from) this pytest
process. The data: SynthEventsJob's events (500 users x 200 items x 14 days, 2026-01-04 .. 2026-01-17),
RECSYS_HOME in a temp folder,
a tiny training config. `baselines: false` plus a gate config with `allow_missing_baselines: true` keeps the
first-model gate lenient (the popularity/EASE gates are then skipped; floors, coverage and sanity still apply): a
3-epoch model does not beat popularity on this data. Without that gate config missing baselines fail the gate.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.dataset as ds
import pytest

from pipeline.data.synth_events import SynthEventsJob
from pipeline.orchestration.dev.local_airflow import REPO_DAGS, airflow_env

pytestmark = pytest.mark.slow

MODEL = "recsys-test-model"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
FIRST_DAY, LAST_DAY = "2026-01-04", "2026-01-17"  # 14 days; 2026-01-18 is a Sunday (@weekly)
WEEKLY_LOGICAL = "2026-01-18"  # data interval ends 2026-01-18 → as-of 2026-01-17, the last event day
DAILY_DATE = LAST_DAY

TINY_TRAIN = """\
epochs: 3
patience: 2
batch_size: 100
compare_base: false
baselines: false
vae:
  hidden_dims: [32]
  latent_dim: 16
"""


class Env:
    def __init__(self, root: Path) -> None:
        self.home = root / "home"
        self.events = self.home / "events"
        self.tracking = f"sqlite:///{self.home / 'mlflow.db'}"
        self.train_config = root / "train.yaml"
        self.train_config.write_text(TINY_TRAIN)
        self.gate_config = root / "gates.yaml"
        self.gate_config.write_text("allow_missing_baselines: true\n")
        self.recsys_env = {
            "RECSYS_HOME": str(self.home), "RECSYS_TRAIN_CONFIG": str(self.train_config), "RECSYS_MODEL_NAME": MODEL,
            "RECSYS_WINDOW_DAYS": "14", "RECSYS_TOP_N": "20", "RECSYS_SPARK_MASTER": "local[2]", "RECSYS_DEVICE": "cpu",
            "RECSYS_GATE_MODE": "enabled", "RECSYS_GATE_CONFIG": str(self.gate_config), "MLFLOW_TRACKING_URI": self.tracking,
            "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable,
            # the DAGs retry with exponential backoff (2-5 min): cap each retry's wait so a failing run ends quickly
            "AIRFLOW__CORE__MAX_TASK_RETRY_DELAY": "1",
            "RECSYS_EVENTS_URI": str(self.events), "RECSYS_LAKE_URI": str(self.home / "lake"),
            "RECSYS_RECS_URI": str(self.home / "lake"),
        }
        self.airflow_home = root / "airflow"
        self.env = airflow_env(self.airflow_home, REPO_DAGS, extra=self.recsys_env)
        self.env.pop("RECSYS_LEDGER", None)  # the default promotion ledger, under RECSYS_HOME
        self.weekly: subprocess.CompletedProcess[str] | None = None
        self.daily: subprocess.CompletedProcess[str] | None = None

    def airflow(self, *args: str, extra: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        t0 = time.perf_counter()
        r = subprocess.run([str(Path(sys.executable).with_name("airflow")), *args], env={**self.env, **(extra or {})},
                           cwd=self.airflow_home, capture_output=True, text=True, timeout=timeout, check=False)
        print(f"airflow {' '.join(args)}: exit {r.returncode} in {time.perf_counter() - t0:.1f} s")
        return r


def _tail(r: subprocess.CompletedProcess[str] | None) -> str:
    return "" if r is None else (r.stdout + r.stderr)[-6000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory):
    """Synthetic events, a migrated Airflow DB, then the weekly DAG and the daily DAG for DAILY_DATE."""
    e = Env(tmp_path_factory.mktemp("dag-runs"))
    e.home.mkdir(parents=True, exist_ok=True)
    SynthEventsJob(users=500, items=200, days=14, start=FIRST_DAY, out=str(e.events), seed=0).run()
    r = e.airflow("db", "migrate")
    assert r.returncode == 0, _tail(r)
    e.weekly = e.airflow("dags", "test", "weekly_train", WEEKLY_LOGICAL)
    if e.weekly.returncode == 0:  # else the daily sensor would wait hours for a champion: the tests report the weekly
        e.daily = e.airflow("dags", "test", "daily_inference", DAILY_DATE)
    return e


def test_weekly_registers_version_1_and_makes_it_champion(runs: Env) -> None:
    from pipeline.io.registry import alias_version, version_tags

    assert runs.weekly is not None and runs.weekly.returncode == 0, _tail(runs.weekly)
    assert (runs.home / "lake" / "snapshots" / f"as_of={LAST_DAY}").is_dir()
    assert alias_version(MODEL, "champion", runs.tracking) == "1"
    tags = version_tags(MODEL, "1", runs.tracking)
    assert tags["gate.verdict"] == "passed" and tags["gate.mode"] == "enabled"
    assert tags["snapshot_uri"].endswith(f"as_of={LAST_DAY}")


def test_daily_publishes_the_date_with_one_row_per_active_user(runs: Env) -> None:
    from pipeline.serving.recs import read_recommendations

    assert runs.daily is not None and runs.daily.returncode == 0, _tail(runs.daily)
    partition = runs.home / "lake" / "recommendations" / f"dt={DAILY_DATE}"
    assert any(partition.glob("run-*/part-*.parquet")) and (partition.parent / "_delta_log").is_dir()
    recs = read_recommendations(str(runs.home / "lake"), DAILY_DATE)
    events = ds.dataset(runs.events, format="parquet", partitioning="hive").to_table(
        filter=ds.field("dt") <= DAILY_DATE, columns=["user_id"])
    active = pc.unique(events.column("user_id"))
    assert recs.num_rows == len(active) > 0
    assert pc.count_distinct(recs.column("user_id")).as_py() == recs.num_rows
    assert pc.all(pc.is_in(recs.column("user_id"), value_set=active)).as_py()
    assert set(recs.column("model_version").to_pylist()) == {"1"}
    assert recs.schema.metadata[b"model_version"] == b"1"


def test_tasks_hand_each_other_typed_results_as_xcom(runs: Env) -> None:
    """What each task returned is its job's typed result as JSON (read from Airflow's own metadata DB), and the
    next task's job was built from it: no task parses another's printed output."""
    import json
    import sqlite3

    from pipeline.data.build_matrix import BuildResult
    from pipeline.io.snapshot import manifest_digest, read_manifest
    from pipeline.serving.job import InferResult
    from pipeline.training.gate import GateResult
    from pipeline.training.train_job import TrainResult

    assert runs.weekly is not None and runs.weekly.returncode == 0, _tail(runs.weekly)
    with sqlite3.connect(runs.airflow_home / "airflow.db") as db:
        rows = db.execute("SELECT dag_id, task_id, value FROM xcom WHERE key = 'return_value'").fetchall()
    values: dict[tuple[str, str], object] = {}
    for dag_id, task_id, value in rows:
        v = json.loads(value) if isinstance(value, str | bytes) else value
        values[(dag_id, task_id)] = json.loads(v) if isinstance(v, str) else v  # stored as JSON (maybe of a string)
    built = BuildResult.model_validate(values[("weekly_train", "build_matrix")])
    trained = TrainResult.model_validate(values[("weekly_train", "train")])
    verdict = GateResult.model_validate(values[("weekly_train", "gate_and_promote")])
    published = InferResult.model_validate(values[("daily_inference", "infer")])
    assert built.snapshot_uri.endswith(f"as_of={LAST_DAY}") and built.digest == manifest_digest(read_manifest(built.snapshot_uri))
    assert (trained.model_name, trained.version) == (MODEL, "1") and "test.ndcg_at_100" in trained.metrics
    assert (verdict.version, verdict.passed, verdict.promoted) == ("1", True, True)
    assert published.partition_uri == str(runs.home / "lake" / "recommendations" / f"dt={DAILY_DATE}")
    assert published.model_version == "1" and published.users > 0


def test_a_weekly_run_whose_training_fails_leaves_champion_unchanged(runs: Env, tmp_path: Path) -> None:
    from pipeline.io.registry import alias_version, client

    assert alias_version(MODEL, "champion", runs.tracking) == "1"  # what the first run left
    bad = tmp_path / "bad-train.yaml"
    bad.write_text("epochs: 0\nno_such_key: 1\n")  # TrainJob rejects both: `recsys train` exits non-zero
    sink = tmp_path / "alerts.jsonl"
    r = runs.airflow("dags", "test", "weekly_train", WEEKLY_LOGICAL,
                     extra={"RECSYS_TRAIN_CONFIG": str(bad), "RECSYS_ALERT_CALLBACK": "alert_sink:record",
                            "ALERT_SINK_FILE": str(sink), "PYTHONPATH": str(FIXTURES)})
    assert r.returncode != 0, _tail(r)
    assert "DagRun failed" in r.stdout + r.stderr
    alerts = [json.loads(line) for line in sink.read_text().splitlines()]  # the failure hook reached the operator's target
    assert alerts and {a["task_id"] for a in alerts} == {"train"}
    assert all(a["dag_id"] == "weekly_train" and "epochs" in a["error"] for a in alerts)
    assert alias_version(MODEL, "champion", runs.tracking) == "1"
    assert [str(v.version) for v in client(runs.tracking).search_model_versions(f"name='{MODEL}'")] == ["1"]



TINY_CANDIDATES = """\
common: {epochs: 2, patience: 2, batch_size: 100, compare_base: false, baselines: false, diagnose: false,
         vae: {hidden_dims: [32], latent_dim: 16}}
candidates:
  - {model: multivae-pia}
  - {model: ease, l2_grid: [50.0, 200.0]}
"""


def test_the_weekly_run_with_candidates_trains_gates_and_promotes_the_best(runs: Env, tmp_path: Path) -> None:
    """RECSYS_CANDIDATES_CONFIG: build_matrix → train_candidates → champion_moved through Airflow; both candidates
    are registered in one group and gated against the same champion, and the best passing one becomes champion."""
    from pipeline.io.registry import alias_version, client, version_tags

    before = {str(v.version) for v in client(runs.tracking).search_model_versions(f"name='{MODEL}'")}
    config = tmp_path / "candidates.yaml"
    config.write_text(TINY_CANDIDATES)
    r = runs.airflow("dags", "test", "weekly_train", WEEKLY_LOGICAL, extra={"RECSYS_CANDIDATES_CONFIG": str(config)})
    assert r.returncode == 0, _tail(r)
    new = sorted({str(v.version) for v in client(runs.tracking).search_model_versions(f"name='{MODEL}'")} - before, key=int)
    assert len(new) == 2
    tags = [version_tags(MODEL, v, runs.tracking) for v in new]
    assert [t["model"] for t in tags] == ["multivae-pia", "ease"]
    assert len({t["candidates.group"] for t in tags}) == 1
    assert all(t["gate.verdict"] in ("passed", "failed") for t in tags)  # every candidate was gated
    champion = alias_version(MODEL, "champion", runs.tracking)
    assert champion in new and version_tags(MODEL, champion, runs.tracking)["gate.verdict"] == "passed"
