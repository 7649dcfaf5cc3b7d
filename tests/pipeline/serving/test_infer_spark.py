"""The Spark engine (mapInArrow on local[2]) publishes the same recommendations as the local engine."""

from __future__ import annotations

import datetime as dt
import itertools
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from infer_support import events_table, run_infer, tiny_bundle, write_events

from pipeline.errors import DataError
from pipeline.serving.job import InferJob, publish_recommendations
from pipeline.serving.recs import files_for_users, read_recommendations


@pytest.mark.slow
def test_spark_engine_equals_local_engine(tmp_path: Path, spark) -> None:
    bundle = tiny_bundle()
    events = write_events(events_table(n_users=80, unknown_every=9), str(tmp_path / "events"))
    common = {"date": dt.date(2024, 5, 3), "events": events, "device": "cpu", "top_n": 10, "progress": False,
              "shard_events": 150, "history_days": 2}
    a = run_infer(InferJob(out=str(tmp_path / "local"), engine="local", **common), bundle, "3")  # type: ignore[arg-type]
    b = run_infer(InferJob(out=str(tmp_path / "spark"), engine="spark", **common), bundle, "3")  # type: ignore[arg-type]
    for key in ("rows", "active_users", "fallback_users", "events", "unknown_item_events", "unknown_items"):
        assert a[key] == b[key], key
    la = {r["user_id"]: r for r in read_recommendations(str(tmp_path / "local"), "latest").to_pylist()}
    lb = {r["user_id"]: r for r in read_recommendations(str(tmp_path / "spark"), "latest").to_pylist()}
    assert la.keys() == lb.keys() and b["engine"] == "spark"
    for u, r in la.items():
        assert r["item_ids"] == lb[u]["item_ids"] and r["fallback"] == lb[u]["fallback"] and lb[u]["model_version"] == "3"
        np.testing.assert_allclose(r["scores"], lb[u]["scores"], rtol=1e-5, atol=1e-6)
    # Spark parts cover disjoint user ranges, sorted within: a lookup opens exactly the part holding the user
    assert len(b["files"]) > 1 and "user_sharding" not in b
    ranges = sorted((f["user_min"], f["user_max"]) for f in b["files"])
    assert all(hi < lo2 for (_, hi), (lo2, _) in itertools.pairwise(ranges))
    run_dir = tmp_path / "spark" / "recommendations" / "dt=2024-05-03" / b["run"]
    for f in b["files"]:
        users = pq.read_table(run_dir / f["path"], columns=["user_id"])["user_id"].to_pylist()
        assert users == sorted(users) and (users[0], users[-1]) == (f["user_min"], f["user_max"])
        assert [g["path"] for g in files_for_users(b, pa.array(users[-1:], pa.int64()))] == [f["path"]]
        assert read_recommendations(str(tmp_path / "spark"), "latest", user_ids=users[-1:]).to_pylist() == [lb[users[-1]]]
    # downstream Spark jobs read the published files (scores are BYTE_STREAM_SPLIT-encoded: pipeline.io.publish)
    got = {r["user_id"]: r for r in spark.read.parquet(*(str(run_dir / f["path"]) for f in b["files"])).collect()}
    assert got.keys() == lb.keys() and all(list(got[u]["scores"]) == lb[u]["scores"] for u in lb)


@pytest.mark.slow
def test_spark_engine_refuses_min_weight_without_a_weight_column(tmp_path: Path, spark) -> None:
    events = write_events(events_table(n_users=20).drop_columns(["weight"]), str(tmp_path / "events"))
    job = InferJob(out=str(tmp_path / "out"), engine="spark", date=dt.date(2024, 5, 3), events=events,  # type: ignore[arg-type]
                      device="cpu", top_n=5, progress=False, min_weight=1.0)
    with pytest.raises(DataError, match="--min-weight needs a numeric weight column; the events have none"):
        publish_recommendations(job, tiny_bundle(), "3")
    assert not (tmp_path / "out" / "recommendations" / "_delta_log").exists()  # nothing committed
