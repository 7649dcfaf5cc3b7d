"""pipeline.data.synth_events: deterministic, dt-partitioned, growing over time, chunked (bounded memory)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds

from pipeline.data import synth_events
from pipeline.data.synth_events import SynthEventsJob


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.parquet"))}


def test_deterministic_and_shaped(tmp_path: Path):
    cfg = SynthEventsJob(users=2000, items=500, days=10, out=str(tmp_path / "a"), seed=3)
    r = cfg.run()
    SynthEventsJob(users=2000, items=500, days=10, out=str(tmp_path / "b"), seed=3).run()
    SynthEventsJob(users=2000, items=500, days=10, out=str(tmp_path / "c"), seed=4).run()
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")
    t = ds.dataset(r.uri, format="parquet", partitioning="hive").to_table()
    assert t.num_rows == r.events and sorted({p.name for p in (tmp_path / "a").iterdir()})[0] == "dt=2024-01-01"
    assert len(list((tmp_path / "a").iterdir())) == 10
    users, items = t["user_id"].to_numpy(), t["item_id"].to_numpy()
    real = (users < 2000) & (items < 500)
    assert 0 < (~real).sum() < 0.01 * len(users)  # a few unseen ids
    pairs = users[real] * 500 + items[real]
    assert 0 < len(pairs) - len(np.unique(pairs)) < 0.05 * len(pairs)  # a few duplicate events
    day = t["dt"].to_numpy(zero_copy_only=False)
    first_users = np.unique(users[real & (day == "2024-01-01")])
    assert len(first_users) < 0.75 * 2000  # users arrive over time
    ts_day = t["event_ts"].to_numpy().astype("datetime64[D]").astype(str)
    assert (ts_day == day).all()  # timestamps fall in their partition's day


def test_chunks_bound_memory(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(synth_events, "CHUNK_EVENTS", 5_000)
    r = SynthEventsJob(users=3000, items=400, days=3, out=str(tmp_path / "e"), seed=0).run()
    parts = list((tmp_path / "e" / "dt=2024-01-02").glob("part-*.parquet"))
    assert len(parts) > 10  # one file per (chunk of users, day): no chunk ever holds the whole stream
    assert r.files == len(list((tmp_path / "e").rglob("*.parquet")))
