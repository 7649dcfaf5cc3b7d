"""pipeline.data.dq thresholds, and every gate tripped through the real job: nothing published, the previous
snapshot still loads."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data import dq
from pipeline.data.build_matrix import BuildMatrixJob
from pipeline.data.synth_events import SynthEventsJob
from pipeline.errors import DataError
from pipeline.io.snapshot import load_snapshot, read_manifest

AS_OF = dt.date(2024, 1, 7)
NEXT = dt.date(2024, 1, 14)


def test_check_functions():
    cfg = dq.DQConfig(max_duplicate_fraction=0.1, max_drop_fraction=0.2)
    assert all(r.passed for r in dq.check_events(dq.EventStats(events=100, pairs=95), cfg))
    bad = {r.name for r in dq.check_events(dq.EventStats(events=100, pairs=80, null_ids=1, future_events=2), cfg)
           if not r.passed}
    assert bad == {"duplicate_ratio", "null_ids", "future_events"}
    drops = dq.check_drops({"events": 70, "users": 100, "items": 10}, {"events": 100, "users": 100, "items": 5}, cfg)
    assert [r.passed for r in drops] == [False, True, True]
    assert dq.check_drops({"events": 1, "users": 1, "items": 1}, None, cfg)[0].passed
    assert not dq.check_schema({"user_id": "float", "item_id": "int"}).passed
    assert not dq.check_schema({"user_id": "int"}).passed
    with pytest.raises(DataError, match=r"events_drop failed \(events: 70 now vs 100.*max 20.0%"):
        dq.enforce(drops, "here")


def cfg_for(events: Path, lake: Path, as_of: dt.date = NEXT, **kw) -> BuildMatrixJob:
    return BuildMatrixJob(events=str(events), as_of=as_of, window_days=7, out=str(lake), spark_master="local[2]",
                             shuffle_partitions=2, n_valid=20, n_test=20, **kw)


@pytest.fixture(scope="module")
def lake(spark, tmp_path_factory):
    root = tmp_path_factory.mktemp("dq")
    SynthEventsJob(users=800, items=300, days=7, out=str(root / "good"), seed=5).run()
    cfg_for(root / "good", root / "lake", as_of=AS_OF).run()
    return root


def write_day(root: Path, day: str, table: pa.Table) -> Path:
    (root / f"dt={day}").mkdir(parents=True, exist_ok=True)
    pq.write_table(table, root / f"dt={day}" / "part-0.parquet")
    return root


def events(n: int, users: np.ndarray | None = None, ts: str = "2024-01-10T12:00:00", dup: int = 1) -> pa.Table:
    rng = np.random.default_rng(0)
    u = users if users is not None else rng.integers(0, 200, n)
    i = rng.integers(0, 100, n)
    u, i = np.repeat(u, dup), np.repeat(i, dup)
    return pa.table({"user_id": pa.array(u, pa.int64()), "item_id": pa.array(i, pa.int64()),
                     "event_ts": pa.array(np.full(len(u), np.datetime64(ts, "us")), pa.timestamp("us", tz="UTC")),
                     "weight": pa.array(np.ones(len(u)), pa.float64())})


def bad_inputs(root: Path) -> dict[str, tuple[Path, dict]]:
    good = events(3000)
    ts_bad = pa.concat_tables([good, events(50, ts="2023-12-01T00:00:00")])
    nulls = pa.table({**{c: good[c] for c in good.schema.names},
                      "user_id": pa.array([None, *good["user_id"].to_pylist()[1:]], pa.int64())})
    neg = good.set_column(0, "user_id", pa.array(np.r_[-1, good["user_id"].to_numpy()[1:]], pa.int64()))
    return {
        "schema": (write_day(root / "schema", "2024-01-10", good.set_column(1, "item_id", pa.array(
            good["item_id"].to_numpy().astype(float)))), {}),
        "null_ids": (write_day(root / "null", "2024-01-10", nulls), {}),
        "negative_ids": (write_day(root / "neg", "2024-01-10", neg), {}),
        "future_events": (write_day(root / "future", "2024-01-10", pa.concat_tables([good, events(3, ts="2024-02-01")])), {}),
        "out_of_window": (write_day(root / "oow", "2024-01-10", ts_bad), {}),
        "zero_events": (write_day(root / "old", "2023-01-01", good), {}),
        "duplicate_ratio": (write_day(root / "dup", "2024-01-10", events(2000, dup=3)), {}),
        "events_drop": (write_day(root / "small", "2024-01-10", events(400, users=np.repeat(np.arange(80), 5))), {}),
    }


def test_every_gate_blocks_publication(lake: Path):
    before = read_manifest(str(lake / "lake" / "snapshots" / f"as_of={AS_OF}"))
    for gate, (events_root, kw) in bad_inputs(lake / "bad").items():
        with pytest.raises(DataError, match=gate) as e:
            cfg_for(events_root, lake / "lake", **kw).run()
        assert "Fix:" in str(e.value)
        assert not (lake / "lake" / "snapshots" / f"as_of={NEXT}" / "manifest.json").exists(), gate
    snap = load_snapshot(str(lake / "lake" / "snapshots" / f"as_of={AS_OF}"))
    assert snap.manifest == before and snap.train.nnz > 0
    assert {r["name"] for r in before["dq"]} == {"schema", "zero_events", "null_ids", "negative_ids", "future_events",
                                                  "out_of_window", "duplicate_ratio", "events_drop", "users_drop",
                                                  "items_drop"}
