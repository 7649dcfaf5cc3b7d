"""The Spark inference engine on a real standalone cluster (tests/spark_cluster.py): `recsys infer --engine spark`
with RECSYS_SPARK_MASTER=spark://... publishes the same lists as the local engine (scores within float tolerance),
the parts written by the executors into the run folder and committed by the driver (one Delta commit, readers
unchanged). An unreachable master is one line and publishes nothing."""

from __future__ import annotations

import datetime as dt
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from infer_support import events_table, run_infer, tiny_bundle, write_events

from pipeline.errors import DataError
from pipeline.serving.job import InferJob, publish_recommendations
from pipeline.serving.recs import read_recommendations

DAY = dt.date(2024, 5, 3)
pytestmark = pytest.mark.slow


def test_cluster_engine_publishes_the_local_engines_lists(spark_cluster, tmp_path: Path) -> None:
    from spark_cluster import REPO, cluster_env

    bundle = tiny_bundle()
    model = bundle.save(tmp_path / "bundle")
    events = write_events(events_table(n_users=80, unknown_every=9), str(tmp_path / "events"))
    local = run_infer(InferJob(out=str(tmp_path / "local"), engine="local", date=DAY, events=events, device="cpu",
                               top_n=10, progress=False, shard_events=150, history_days=2), bundle, "3")
    cfg = spark_cluster.spark_config()
    env = {**cluster_env(), "RECSYS_SPARK_MASTER": cfg["master"], "RECSYS_SPARK_DRIVER_HOST": "127.0.0.1",
           "RECSYS_SPARK_BIND_ADDRESS": "127.0.0.1", "RECSYS_SPARK_EXECUTOR_MEMORY": cfg["executor_memory"],
           "RECSYS_SPARK_DRIVER_MEMORY": "1g", "RECSYS_SPARK_CONF": '{"spark.network.timeout": "60s"}'}
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli.main", "infer", "--engine", "spark", "--date", DAY.isoformat(),
         "--events", events, "--out", str(tmp_path / "cluster"), "--model", str(model), "--device", "cpu",
         "--top-n", "10", "--no-progress", "--shard-events", "150", "--history-days", "2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    la = {r["user_id"]: r for r in read_recommendations(str(tmp_path / "local"), DAY).to_pylist()}
    lb = {r["user_id"]: r for r in read_recommendations(str(tmp_path / "cluster"), DAY).to_pylist()}
    assert la.keys() == lb.keys() and len(la) == local["rows"]
    for u, r in la.items():
        assert r["item_ids"] == lb[u]["item_ids"] and r["fallback"] == lb[u]["fallback"]
        np.testing.assert_allclose(r["scores"], lb[u]["scores"], rtol=1e-5, atol=1e-6)
    part = tmp_path / "cluster" / "recommendations" / f"dt={DAY}"
    runs = [p.name for p in part.iterdir() if p.name.startswith("run-")]
    assert len(runs) == 1 and (part.parent / "_delta_log").is_dir()
    files = sorted(p.name for p in (part / runs[0]).glob("part-*.parquet"))
    assert len(files) >= 2  # one per task (user range), written by the executors
    # the executors of both workers ran tasks of this application
    assert all(any((spark_cluster.home / f"worker-{k}").glob("app-*/*/stderr")) for k in range(2))


def test_unreachable_master_publishes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("RECSYS_SPARK_MASTER", f"spark://127.0.0.1:{port}")
    events = write_events(events_table(n_users=20), str(tmp_path / "events"))
    job = InferJob(out=str(tmp_path / "out"), engine="spark", date=DAY, events=events, device="cpu", top_n=5,
                   progress=False)
    with pytest.raises(DataError, match=rf"Spark master spark://127\.0\.0\.1:{port} is unreachable") as e:
        publish_recommendations(job, tiny_bundle(), "1")
    assert "\n" not in str(e.value)
    part = tmp_path / "out" / "recommendations" / f"dt={DAY}"
    assert not part.exists() or not any(p.name.startswith("run-") for p in part.iterdir())
    assert not (part.parent / "_delta_log").exists()
