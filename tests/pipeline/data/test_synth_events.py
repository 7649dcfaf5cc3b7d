"""pipeline.data.synth_events: deterministic, dt-partitioned, growing over time, chunked (bounded memory)."""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest

from pipeline.data import synth_events
from pipeline.data.synth_events import SynthEventsJob
from pipeline.errors import DataError
from pipeline.io.output_guard import EVENTS_MARKER
from pipeline.io.snapshot import table_bytes


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.parquet"))}


def test_deterministic_and_shaped(tmp_path: Path):
    cfg = SynthEventsJob(users=2000, items=500, days=10, out=str(tmp_path / "a"), seed=3)
    r = cfg.run()
    SynthEventsJob(users=2000, items=500, days=10, out=str(tmp_path / "b"), seed=3).run()
    SynthEventsJob(users=2000, items=500, days=10, out=str(tmp_path / "c"), seed=4).run()
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")
    t = ds.dataset(r.uri, format="parquet", partitioning="hive").to_table()
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert t.num_rows == r.events and names[0] == EVENTS_MARKER and names[1] == "dt=2024-01-01"
    assert len(names) == 1 + 10
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


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_refuses_an_out_it_did_not_write(tmp_path: Path):
    """The old job deleted whatever --out held; now a foreign, non-empty folder or a file is refused untouched."""
    lake = tmp_path / "lake"
    (lake / "dt=2024-01-01").mkdir(parents=True)
    (lake / "dt=2024-01-01" / "part-0.parquet").write_bytes(b"real events")
    (tmp_path / "f.parquet").write_bytes(b"a file")
    before = tree(tmp_path)
    for out, expect in ((lake, "not written by recsys synth"), (tmp_path / "f.parquet", "is a file"),
                        (tmp_path, "not written by recsys synth")):
        with pytest.raises(DataError, match=expect) as e:
            SynthEventsJob(users=50, items=40, days=2, out=str(out)).run()
        assert "\n" not in str(e.value) and "Fix:" in str(e.value)
    assert tree(tmp_path) == before


def test_rerun_replaces_its_own_output_and_a_failure_keeps_it(tmp_path: Path, monkeypatch):
    out = tmp_path / "ev"
    SynthEventsJob(users=200, items=100, days=3, out=str(out), seed=1).run()
    SynthEventsJob(users=200, items=100, days=2, out=str(out), seed=2).run()  # idempotent re-runs keep working
    SynthEventsJob(users=200, items=100, days=2, out=str(tmp_path / "ref"), seed=2).run()
    assert digest(out) == digest(tmp_path / "ref") and not (out / "dt=2024-01-03").exists()
    before = tree(tmp_path)
    calls = []

    def failing(table):
        calls.append(1)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        return table_bytes(table)

    monkeypatch.setattr(synth_events, "table_bytes", failing)
    with pytest.raises(OSError, match="No space"):
        SynthEventsJob(users=200, items=100, days=2, out=str(out), seed=3).run()
    assert tree(tmp_path) == before and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("start,days", [("9999-12-30", 5), ("2024-01-01", 10**9), ("0001-01-01", 3_652_060)])
def test_calendar_end_is_one_line(tmp_path: Path, capsys, start: str, days: int):
    from pipeline.cli.main import main

    rc = main(["synth", "--users", "10", "--items", "40", "--days", str(days), "--start", start,
               "--out", str(tmp_path / "ev")])
    err = capsys.readouterr().err
    assert rc == 2 and "past the calendar's last day" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "ev").exists() and list(tmp_path.iterdir()) == []


def test_last_calendar_day_itself_works(tmp_path: Path):
    r = SynthEventsJob(users=100, items=40, days=2, start=dt.date(9999, 12, 30), out=str(tmp_path / "ev")).run()
    assert sorted(p.name for p in (tmp_path / "ev").iterdir() if p.name.startswith("dt="))[-1] == "dt=9999-12-31"
    assert r.events > 0


def test_s3_refuses_foreign_prefix_and_bucket_root_and_reruns(s3_bucket: str):
    from pipeline.io.lake import resolve

    resolve(f"{s3_bucket}/events/dt=2024-01-01/part-0.parquet").write_bytes(b"real events")
    for out, expect in ((f"{s3_bucket}/events", "not written by"), (s3_bucket, "bucket root")):
        with pytest.raises(DataError, match=expect):
            SynthEventsJob(users=50, items=40, days=2, out=out).run()
    assert resolve(f"{s3_bucket}/events/dt=2024-01-01/part-0.parquet").read_bytes() == b"real events"
    uri = f"{s3_bucket}/mine"
    SynthEventsJob(users=100, items=40, days=3, out=uri).run()
    SynthEventsJob(users=100, items=40, days=2, out=uri).run()
    assert resolve(uri).list() == [EVENTS_MARKER, "dt=2024-01-01", "dt=2024-01-02"]


def test_the_catalogue_genres_are_the_events_taste_clusters(tmp_path: Path):
    """synth_catalog's genre is the item's taste cluster as write_events drew it: most of a user's clicks fall in
    one genre (cluster_share 0.8), which a wrong replay of the draws would not give; new titles have no events."""
    cfg = SynthEventsJob(users=600, items=200, days=5, out=str(tmp_path / "ev"), seed=5)
    cfg.run()
    cat = synth_events.synth_catalog(cfg, new_titles=7)
    assert cat.num_rows == 207 and cat.column("item_id").to_pylist()[:3] == [0, 1, 2]
    new_ids = cat.column("item_id").to_numpy()[200:]
    assert (new_ids >= synth_events.NEW_TITLE_BASE).all()
    genre = np.array([int(t[0].split("-")[1]) for t in cat.column("tags").to_pylist()[:200]])
    t = ds.dataset(tmp_path / "ev", format="parquet", partitioning="hive").to_table()
    users, items = t["user_id"].to_numpy(), t["item_id"].to_numpy()
    real = (users < 600) & (items < 200)
    assert not np.isin(items, new_ids).any()
    share = [np.bincount(genre[items[real & (users == u)]]).max() / max(1, (real & (users == u)).sum())
             for u in range(0, 600, 10) if (real & (users == u)).any()]
    assert np.mean(share) > 0.45, np.mean(share)
    wrong = np.roll(genre, 1)  # a catalogue off by one item: genres no longer match the clicks
    share_wrong = [np.bincount(wrong[items[real & (users == u)]]).max() / max(1, (real & (users == u)).sum())
                   for u in range(0, 600, 10) if (real & (users == u)).any()]
    assert np.mean(share_wrong) < np.mean(share) - 0.15, (np.mean(share_wrong), np.mean(share))
