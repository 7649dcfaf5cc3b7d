"""The weekly snapshot's optional item_metadata (BuildMatrixJob.items, real Spark local[2]): which items are cold
(metadata, no training click this snapshot), read back by load_snapshot; without items the snapshot has none
(older snapshots load as before); a bad items file publishes nothing."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pipeline.data.build_matrix import BuildMatrixJob
from pipeline.data.synth_events import SynthEventsJob
from pipeline.errors import DataError
from pipeline.io.snapshot import load_snapshot

AS_OF = dt.date(2024, 1, 7)
NEW = (9_000_001, 9_000_002)


def config(events: Path, lake: Path, **kw: object) -> BuildMatrixJob:
    return BuildMatrixJob(events=str(events), as_of=AS_OF, out=str(lake), window_days=7, spark_master="local[2]",
                          shuffle_partitions=2, seed=7, **kw)


def items_file(path: Path, ids: list[int]) -> str:
    pq.write_table(pa.table({"item_id": pa.array(ids, pa.int64()), "title": [f"t{i}" for i in ids],
                             "tags": [["drama"] if i % 2 else ["comedy"] for i in ids]}), path)
    return str(path)


@pytest.mark.slow
def test_item_metadata_marks_cold_items(spark, tmp_path: Path) -> None:
    events = tmp_path / "events"
    SynthEventsJob(users=600, items=150, days=7, out=str(events), seed=3).run()
    known = sorted(set(ds.dataset(events, partitioning="hive").to_table(columns=["item_id"]).column("item_id").to_pylist()))
    meta_ids = [int(i) for i in known[:40]] + list(NEW)
    config(events, tmp_path / "plain").run()
    assert load_snapshot(str(tmp_path / "plain" / "snapshots" / f"as_of={AS_OF}")).item_metadata is None
    config(events, tmp_path / "lake", items=items_file(tmp_path / "items.parquet", meta_ids)).run()
    snap = load_snapshot(str(tmp_path / "lake" / "snapshots" / f"as_of={AS_OF}"))
    t = snap.item_metadata
    assert t is not None and t.num_rows == len(meta_ids) and {"title", "tags"} <= set(t.column_names)
    rows = {r["item_id"]: r for r in t.to_pylist()}
    warm = set(np.asarray(snap.item_ids)[np.asarray(snap.train.sum(axis=0)).ravel() > 0].tolist())
    for i in NEW:
        assert rows[i]["cold"] and rows[i]["item_idx"] is None
    for i in meta_ids[:40]:
        r = rows[i]
        assert r["cold"] == (i not in warm)
        if r["item_idx"] is not None:
            assert snap.item_ids[r["item_idx"]] == i
    c = snap.manifest["counts"]
    assert c["items_with_metadata"] == len(meta_ids) and c["cold_items"] == sum(r["cold"] for r in rows.values()) >= 2
    bad = tmp_path / "bad"
    with pytest.raises(DataError, match="appears 2 times"):
        config(events, bad, items=items_file(tmp_path / "dup.parquet", [*meta_ids, NEW[0]])).run()
    assert not (bad / "snapshots" / f"as_of={AS_OF}" / "manifest.json").exists()
