"""The `spark` execution profile, end to end through Airflow's own runner (`airflow dags test`) on a real Spark
standalone cluster on 127.0.0.1 (tests/spark_cluster.py: a master and two 1-core workers).

The same DAG files as the embedded tests, with RECSYS_PROFILE=spark: the build and the daily scoring are submitted
to the cluster with the Airflow Spark provider's spark-submit (client mode), and training is launched onto the
cluster's workers with TorchDistributor (2 CPU processes, gloo). Then, against the embedded profile on the same
events: the snapshot has the same content hash, and the published lists are the embedded engine's for the same model
(scores within float tolerance). A job that fails on the cluster fails its task with the job's own one-line message.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_dag_runs import TINY_TRAIN  # the same tiny model as the embedded DAG runs

from pipeline.data.synth_events import SynthEventsJob
from pipeline.orchestration.dev.local_airflow import REPO_DAGS, airflow_env

pytestmark = pytest.mark.slow

MODEL = "recsys-spark-profile"
FIRST_DAY, LAST_DAY, WEEKLY_LOGICAL = "2026-01-04", "2026-01-17", "2026-01-18"


class Env:
    def __init__(self, root: Path, master_url: str) -> None:
        import pyspark

        spark_home = Path(pyspark.__file__).parent
        self.home = root / "home"
        self.events = self.home / "events"
        self.lake = self.home / "lake"
        self.tracking = f"sqlite:///{self.home / 'mlflow.db'}"
        (root / "train.yaml").write_text(TINY_TRAIN)
        (root / "gates.yaml").write_text("allow_missing_baselines: true\n")
        host_port = master_url.removeprefix("spark://")
        recsys = {
            "RECSYS_PROFILE": "spark", "RECSYS_HOME": str(self.home), "RECSYS_TRAIN_CONFIG": str(root / "train.yaml"),
            "RECSYS_MODEL_NAME": MODEL, "RECSYS_WINDOW_DAYS": "14", "RECSYS_TOP_N": "20", "RECSYS_DEVICE": "cpu",
            "RECSYS_GATE_CONFIG": str(root / "gates.yaml"), "MLFLOW_TRACKING_URI": self.tracking,
            "RECSYS_EVENTS_URI": str(self.events), "RECSYS_LAKE_URI": str(self.lake), "RECSYS_RECS_URI": str(self.lake),
            # the cluster: spark-submit's master from the Airflow connection, the rest from the settings
            "AIRFLOW_CONN_SPARK_DEFAULT": f"spark://{host_port}", "RECSYS_SPARK_MASTER": master_url,
            "RECSYS_SPARK_DRIVER_HOST": "127.0.0.1", "RECSYS_SPARK_BIND_ADDRESS": "127.0.0.1",
            "RECSYS_SPARK_CONF": json.dumps({"spark.executor.cores": "1", "spark.executor.memory": "640m",
                                             "spark.driver.memory": "1g", "spark.network.timeout": "60s"}),
            "RECSYS_TRAIN_PROCESSES": "2",
            "SPARK_HOME": str(spark_home), "PATH": f"{spark_home / 'bin'}:{Path(sys.executable).parent}:/usr/bin:/bin",
            "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable,
            "OMP_NUM_THREADS": "1", "AIRFLOW__CORE__MAX_TASK_RETRY_DELAY": "1",
        }
        self.airflow_home = root / "airflow"
        self.env = airflow_env(self.airflow_home, REPO_DAGS, extra=recsys)
        self.env.pop("RECSYS_LEDGER", None)
        self.weekly: subprocess.CompletedProcess[str] | None = None
        self.daily: subprocess.CompletedProcess[str] | None = None

    def airflow(self, *args: str, extra: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        t0 = time.perf_counter()
        r = subprocess.run([str(Path(sys.executable).with_name("airflow")), *args], env={**self.env, **(extra or {})},
                           cwd=self.airflow_home, capture_output=True, text=True, timeout=timeout, check=False)
        print(f"airflow {' '.join(args)}: exit {r.returncode} in {time.perf_counter() - t0:.1f} s")
        return r


def _tail(r: subprocess.CompletedProcess[str] | None) -> str:
    return "" if r is None else (r.stdout + r.stderr)[-8000:]


def _xcom(e: Env, dag_id: str, task_id: str) -> dict:
    import sqlite3

    with sqlite3.connect(e.airflow_home / "airflow.db") as db:
        rows = db.execute("SELECT value FROM xcom WHERE dag_id=? AND task_id=? AND key='return_value'",
                          (dag_id, task_id)).fetchall()
    assert rows, f"no XCom for {dag_id}.{task_id}"
    value = rows[-1][0]
    return json.loads(value if isinstance(value, str) else value.decode())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, spark_cluster):
    e = Env(tmp_path_factory.mktemp("spark-profile"), spark_cluster.master_url)
    e.home.mkdir(parents=True, exist_ok=True)
    SynthEventsJob(users=500, items=200, days=14, start=FIRST_DAY, out=str(e.events), seed=0).run()
    r = e.airflow("db", "migrate")
    assert r.returncode == 0, _tail(r)
    e.weekly = e.airflow("dags", "test", "weekly_train", WEEKLY_LOGICAL)
    if e.weekly.returncode == 0:
        e.daily = e.airflow("dags", "test", "daily_inference", LAST_DAY)
    return e


def test_weekly_on_the_cluster_builds_the_embedded_snapshot_and_trains_with_two_processes(runs: Env) -> None:
    from pipeline.data.build_matrix import BuildMatrixJob
    from pipeline.io.registry import alias_version, client

    assert runs.weekly is not None and runs.weekly.returncode == 0, _tail(runs.weekly)
    built = _xcom(runs, "weekly_train", "build_matrix")
    embedded = BuildMatrixJob(events=str(runs.events), as_of=LAST_DAY, window_days=14, out=str(runs.home / "embedded"),
                              spark_master="local[2]").run()
    # the content hash (files' names and sha256): `digest` also covers the run id and the job's config (its master)
    assert built["content_digest"] == embedded.content_digest and built["counts"] == embedded.counts
    trained = _xcom(runs, "weekly_train", "train")
    run = client(runs.tracking).get_run(trained["run_id"])
    assert run.data.params.get("world_size") == "2"  # launched onto the workers, not trained in the Airflow worker
    assert alias_version(MODEL, "champion", runs.tracking) == trained["version"] == "1"


def test_daily_on_the_cluster_publishes_the_embedded_engine_s_lists(runs: Env, tmp_path: Path) -> None:
    from pipeline.serving.job import InferJob
    from pipeline.serving.recs import read_recommendations

    assert runs.daily is not None and runs.daily.returncode == 0, _tail(runs.daily)
    published = _xcom(runs, "daily_inference", "infer")
    assert published["model_version"] == "1" and published["users"] > 0
    local = InferJob(date=LAST_DAY, events=str(runs.events), out=str(tmp_path), model=f"models:/{MODEL}/1", top_n=20,
                     device="cpu", tracking_uri=runs.tracking, engine="local").run()
    cluster_rows = read_recommendations(str(runs.lake), LAST_DAY).sort_by("user_id").to_pylist()
    assert local.users == published["users"]
    local_rows = read_recommendations(str(tmp_path), LAST_DAY).sort_by("user_id").to_pylist()
    assert [r["user_id"] for r in cluster_rows] == [r["user_id"] for r in local_rows]
    swapped = 0
    for c, loc in zip(cluster_rows, local_rows, strict=True):
        np.testing.assert_allclose(c["scores"], loc["scores"], rtol=1e-5, atol=1e-5)
        swapped += same_list_up_to_float_ties(c, loc, tol=1e-5)
    assert swapped <= max(1, len(local_rows) // 50)  # a tie is an exception, not the rule


def same_list_up_to_float_ties(a: dict, b: dict, tol: float) -> int:
    """Assert two engines' lists for one user agree: the same items in the same order, except items whose scores
    are within `tol` (a near-tie ordered differently: the engines batch users differently and one executor core
    sums in another order than two local threads, moving a score by an ulp); 1 when such a swap occurred."""
    if a["item_ids"] == b["item_ids"]:
        return 0
    sa, sb = dict(zip(a["item_ids"], a["scores"], strict=True)), dict(zip(b["item_ids"], b["scores"], strict=True))
    last = min(a["scores"][-1], b["scores"][-1])
    for items, scores, other in ((a["item_ids"], sa, sb), (b["item_ids"], sb, sa)):
        for i in items:  # an item only one list holds sits at the cut, tied with the last one
            assert i in other or abs(scores[i] - last) <= tol * max(1.0, abs(last)), (a, b)
    for x, y in zip(a["item_ids"], b["item_ids"], strict=True):  # where the order differs, the scores tie
        if x != y:
            assert abs(sa[x] - sa.get(y, sb[y])) <= tol * max(1.0, abs(sa[x])), (a, b)  # x and y tie in a
    return 1


def test_a_job_failing_on_the_cluster_fails_its_task_with_the_job_s_message(runs: Env, tmp_path: Path) -> None:
    from pipeline.io.registry import alias_version

    r = runs.airflow("dags", "test", "weekly_train", "2026-01-25",
                     extra={"RECSYS_EVENTS_URI": str(tmp_path / "no-events"), "RECSYS_LAKE_URI": str(tmp_path / "lake")})
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "RemoteJobFailed: remote build_matrix job failed: DataError: events location" in out, _tail(r)
    assert not (tmp_path / "lake" / "snapshots").exists()
    assert alias_version(MODEL, "champion", runs.tracking) == "1"  # untouched
