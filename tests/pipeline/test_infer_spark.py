"""The Spark engine (mapInArrow on local[2]) publishes the same recommendations as the local engine."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pytest
from infer_support import events_table, tiny_bundle, write_events

from pipeline.infer import InferConfig, run
from pipeline.recs import read_recommendations


@pytest.mark.slow
def test_spark_engine_equals_local_engine(tmp_path: Path, spark) -> None:
    bundle = tiny_bundle()
    events = write_events(events_table(n_users=80, unknown_every=9), str(tmp_path / "events"))
    common = {"date": dt.date(2024, 5, 3), "events": events, "device": "cpu", "top_n": 10, "progress": False,
              "shard_events": 150, "history_days": 2}
    a = run(InferConfig(out=str(tmp_path / "local"), engine="local", **common), bundle, "3")  # type: ignore[arg-type]
    b = run(InferConfig(out=str(tmp_path / "spark"), engine="spark", **common), bundle, "3")  # type: ignore[arg-type]
    for key in ("rows", "active_users", "fallback_users", "events", "unknown_item_events", "unknown_items"):
        assert a[key] == b[key], key
    la = {r["user_id"]: r for r in read_recommendations(str(tmp_path / "local"), "latest").to_pylist()}
    lb = {r["user_id"]: r for r in read_recommendations(str(tmp_path / "spark"), "latest").to_pylist()}
    assert la.keys() == lb.keys() and b["engine"] == "spark"
    for u, r in la.items():
        assert r["item_ids"] == lb[u]["item_ids"] and r["fallback"] == lb[u]["fallback"] and lb[u]["model_version"] == "3"
        np.testing.assert_allclose(r["scores"], lb[u]["scores"], rtol=1e-5, atol=1e-6)
