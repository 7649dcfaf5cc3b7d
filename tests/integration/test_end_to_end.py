"""The whole story on real services, all on 127.0.0.1: no embedded shortcuts, no real AWS.

- the lake is the moto S3 server: events (SynthEventsJob, out=s3://...), matrix snapshots and recommendations
  live under s3:// URIs of a fresh bucket (pipeline.io.lake; Spark stages S3 input locally, see build_matrix);
- MLflow is a real `mlflow server` (SQLite backend, artifacts in the moto bucket `mlflow-artifacts`);
- Airflow 3.3 runs for real (pipeline.orchestration.dev.local_airflow.LocalAirflow: api-server + scheduler + dag-processor, the
  repo's dags/ folder, LocalExecutor task processes that see the RECSYS_* / AWS_* / MLFLOW_* variables);
- Spark local[2].

Weekly: a one-date backfill of weekly_train (logical 2026-01-11 → data interval end 2026-01-18 → as-of 2026-01-17,
the last event day) builds the snapshot, trains a tiny model, gates it and promotes it. Daily: a two-day backfill
(2026-01-16, 2026-01-17). Then a forced failure: the daily DAG for 2026-01-02, a date before the first event
(`recsys infer` refuses: no events up to that date) publishes nothing and leaves the earlier dates intact.

Tiny data (500 users x 200 items x 14 days) and a tiny model keep it to a few minutes on 2 cores; the phase
times are printed (`pytest -s`) and the total is asserted loosely.
"""

from __future__ import annotations

import datetime as dt
import io
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pytest

from pipeline.data.synth_events import SynthEventsJob
from pipeline.io import delta_table, lake
from pipeline.orchestration.dev.local_airflow import REPO_DAGS, LocalAirflow, backfill

MODEL = "recsys-e2e"
FIRST_DAY = "2026-01-04"  # 14 event days: 2026-01-04 .. 2026-01-17
DAILY_DATES = ("2026-01-16", "2026-01-17")
FAILING_DATE = "2026-01-02"  # before the first event: the daily run must fail and publish nothing

TINY_TRAIN = """\
epochs: 3
patience: 2
batch_size: 100
compare_base: false
baselines: false   # a 3-epoch model does not beat popularity here: GATES lets the gate skip the baseline gates
vae:
  hidden_dims: [32]
  latent_dim: 16
"""

# without it, missing baselines fail the gate (closed); the operator opts out explicitly
GATES = "allow_missing_baselines: true\n"


def _partition(recs_uri: str, date: str) -> lake.Location:
    return lake.resolve(recs_uri).join("recommendations", f"dt={date}")


def _live(recs_uri: str, date: str) -> list[str]:
    """The date's live files in the recommendations Delta table (what any Delta reader reads)."""
    table = delta_table.open_table(lake.resolve(recs_uri).join("recommendations"))
    day = dt.date.fromisoformat(date)
    return [] if table is None else [p for p, _ in delta_table.live_files_of(delta_table.live_files(table), day)]


def _active_users(events_uri: str, date: str) -> pa.Array:
    loc = lake.resolve(events_uri)
    table = ds.dataset(loc.path, filesystem=loc.fs, format="parquet", partitioning="hive").to_table(
        filter=ds.field("dt") <= date, columns=["user_id"])
    return pc.unique(table.column("user_id"))


@pytest.mark.slow
def test_weekly_then_daily_backfill_on_s3_mlflow_server_and_airflow(tmp_path: Path, s3_bucket: str,
                                                                    mlflow_server: str) -> None:
    from mlflow import MlflowClient

    times: dict[str, float] = {}
    t_all = t = time.perf_counter()
    events, lake_uri = f"{s3_bucket}/events", f"{s3_bucket}/lake"
    home = tmp_path / "home"
    home.mkdir()
    train_config = tmp_path / "train.yaml"
    train_config.write_text(TINY_TRAIN)
    gate_config = tmp_path / "gates.yaml"
    gate_config.write_text(GATES)
    SynthEventsJob(users=500, items=200, days=14, start=FIRST_DAY, out=events, seed=0).run()
    assert lake.resolve(events).join(f"dt={FIRST_DAY}").exists()
    times["synth to s3"] = time.perf_counter() - t

    extra = {  # AWS_* (moto endpoint, dummy keys) and MLFLOW_S3_ENDPOINT_URL come from the moto_server fixture
        "RECSYS_HOME": str(home), "RECSYS_EVENTS_URI": events, "RECSYS_LAKE_URI": lake_uri, "RECSYS_RECS_URI": lake_uri,
        "MLFLOW_TRACKING_URI": mlflow_server, "RECSYS_MODEL_NAME": MODEL, "RECSYS_TRAIN_CONFIG": str(train_config),
        "RECSYS_WINDOW_DAYS": "14", "RECSYS_TOP_N": "20", "RECSYS_SPARK_MASTER": "local[2]", "RECSYS_DEVICE": "cpu",
        "RECSYS_GATE_MODE": "enabled", "RECSYS_GATE_CONFIG": str(gate_config), "SPARK_LOCAL_IP": "127.0.0.1",
        "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable,
        # the DAGs retry with exponential backoff of minutes: cap each wait so the forced failure ends quickly
        "AIRFLOW__CORE__MAX_TASK_RETRY_DELAY": "1",
    }
    out = io.StringIO()
    t = time.perf_counter()
    with LocalAirflow(home / "airflow", REPO_DAGS, extra_env=extra, quiet=True) as af:
        times["airflow start"] = time.perf_counter() - t

        t = time.perf_counter()
        rc = backfill("weekly_train", "2026-01-11", "2026-01-11", airflow=af, timeout=600, poll=1, out=out)
        times["weekly run"] = time.perf_counter() - t
        assert rc == 0, f"{out.getvalue()}\ntask logs under {af.home / 'logs'}"

        t = time.perf_counter()
        rc = backfill("daily_inference", *DAILY_DATES, airflow=af, timeout=600, poll=1, out=out)
        times["daily x2"] = time.perf_counter() - t
        assert rc == 0, f"{out.getvalue()}\ntask logs under {af.home / 'logs'}"
        committed = {d: _live(lake_uri, d) for d in DAILY_DATES}

        t = time.perf_counter()
        rc = backfill("daily_inference", FAILING_DATE, FAILING_DATE, airflow=af, timeout=300, poll=1, out=out)
        times["forced failure"] = time.perf_counter() - t
        assert rc == 1 and f"{FAILING_DATE}  failed" in out.getvalue(), out.getvalue()
    t = time.perf_counter()

    # the weekly run: snapshot on S3, version 1 registered on the server and promoted to champion
    assert lake.resolve(lake_uri).join("snapshots", "as_of=2026-01-17").exists()
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    model = client.get_registered_model(MODEL)
    assert {k: str(v) for k, v in model.aliases.items()}.get("champion") == "1"
    assert [str(v.version) for v in client.search_model_versions(f"name='{MODEL}'")] == ["1"]
    mv = client.get_model_version(MODEL, "1")
    assert mv.tags["gate.verdict"] == "passed" and mv.tags["snapshot_uri"] == f"{lake_uri}/snapshots/as_of=2026-01-17"
    assert client.get_model_version_by_alias(MODEL, "champion").version in (1, "1")

    # the daily runs: both partitions committed, one row per active user (events up to that date)
    from pipeline.serving.recs import committed_dates, read_recommendations

    for date in DAILY_DATES:
        assert _live(lake_uri, date)
        recs = read_recommendations(lake_uri, date)
        active = _active_users(events, date)
        assert recs.num_rows == len(active) > 0, date
        assert pc.count_distinct(recs.column("user_id")).as_py() == recs.num_rows
        assert pc.all(pc.is_in(recs.column("user_id"), value_set=active)).as_py()
        assert set(recs.column("model_version").to_pylist()) == {"1"}
        assert all(len(items) == 20 for items in recs.column("item_ids").to_pylist())

    # the forced failure: nothing published for that date; the earlier dates untouched
    failed = _partition(lake_uri, FAILING_DATE)
    assert _live(lake_uri, FAILING_DATE) == []
    assert not [n for n in failed.list() if n.startswith("run-")]  # an aborted run leaves no folder behind
    assert {d: _live(lake_uri, d) for d in DAILY_DATES} == committed
    assert sorted(d.isoformat() for d in committed_dates(lake_uri)) == list(DAILY_DATES)
    times["checks"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t_all
    print("\nend-to-end phases: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    assert times["total"] < 900
