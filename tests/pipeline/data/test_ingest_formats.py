"""pipeline.data.ingest: every source format into the events contract; bad inputs leave nothing behind."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from pipeline.data.ingest import IngestJob
from pipeline.errors import DataError


def read_events(uri: str) -> pa.Table:
    return ds.dataset(uri, format="parquet", partitioning="hive").to_table()


def days(uri: str) -> list[str]:
    return sorted(p.name for p in Path(uri).iterdir() if p.name.startswith("dt="))


def test_movielens_csv(tmp_path: Path):
    src = tmp_path / "ratings.csv"
    src.write_text("userId,movieId,rating,timestamp\n1,31,2.5,1260759144\n1,1029,3.0,1260759179\n2,10,4.0,835355493\n")
    r = IngestJob(format="movielens", src=tmp_path, out=str(tmp_path / "ev")).run()
    t = read_events(r.uri)
    assert r.rows == 3 and r.partitioned
    assert days(r.uri) == ["dt=1996-06-21", "dt=2009-12-14"]
    assert t.schema.field("user_id").type == pa.int64() and t.schema.field("event_ts").type == pa.timestamp("us", tz="UTC")
    assert sorted(t["weight"].to_pylist()) == [2.5, 3.0, 4.0]


def test_movielens_dat_and_udata(tmp_path: Path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "ratings.dat").write_text("1::1193::5::978300760\n1::661::3::978302109\n")
    r = IngestJob(format="movielens", src=tmp_path / "a", out=str(tmp_path / "ev1")).run()
    assert sorted(read_events(r.uri)["item_id"].to_pylist()) == [661, 1193]
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "u.data").write_text("196\t242\t3\t881250949\n186\t302\t3\t891717742\n22\t377\t1\t878887116\n")
    r = IngestJob(format="movielens", src=tmp_path / "b", out=str(tmp_path / "ev2"), partition=False).run()
    assert r.rows == 3 and not r.partitioned and days(r.uri) == []
    assert "event_ts" in read_events(r.uri).schema.names


def test_netflix(tmp_path: Path):
    (tmp_path / "mv_0000001.txt").write_text("1:\n1488844,3,2005-09-06\n822109,5,2005-05-13\n")
    (tmp_path / "mv_0000002.txt").write_text("2:\n2059652,4,2005-09-05\n")
    r = IngestJob(format="netflix", src=tmp_path, out=str(tmp_path / "ev")).run()
    t = read_events(r.uri).sort_by("user_id")
    assert t["item_id"].to_pylist() == [1, 1, 2] and t["user_id"].to_pylist() == [822109, 1488844, 2059652]
    assert days(r.uri) == ["dt=2005-05-13", "dt=2005-09-05", "dt=2005-09-06"]


def test_msd_triplets_static(tmp_path: Path):
    src = tmp_path / "train_triplets.txt"
    src.write_text("b80344d063b5ccb3212f76538f3d9e43d87dca9e\tSOAKIMP12A8C130995\t1\n"
                   "b80344d063b5ccb3212f76538f3d9e43d87dca9e\tSOAPDEY12A81C210A9\t12\n")
    r = IngestJob(format="msd", src=src, out=str(tmp_path / "ev")).run()
    t = read_events(r.uri)
    assert not r.partitioned and "event_ts" not in t.schema.names
    assert t.schema.field("user_id").type == pa.string() and sorted(t["weight"].to_pylist()) == [1.0, 12.0]


@pytest.mark.parametrize("name,text,problem", [
    ("ratings.csv", "user,item\n1,2\n", "header"),
    ("ratings.csv", "userId,movieId,rating,timestamp\n1,31,2.5,1260759144\n1,abc,3.0\n", "cannot parse"),
    ("u.data", "196\t242\t3\n", "cannot parse"),
])
def test_bad_movielens_leaves_nothing(tmp_path: Path, name: str, text: str, problem: str):
    (tmp_path / name).write_text(text)
    out = tmp_path / "ev"
    with pytest.raises(DataError, match=problem) as e:
        IngestJob(format="movielens", src=tmp_path / name, out=str(out)).run()
    assert "Fix:" in str(e.value)
    assert not out.exists() and not list(tmp_path.glob(".ev*"))


def test_missing_and_bad_sources(tmp_path: Path):
    with pytest.raises(DataError, match="does not exist"):
        IngestJob(format="msd", src=tmp_path / "nope", out=str(tmp_path / "ev")).run()
    (tmp_path / "mv_1.txt").write_text("12,3,2005-01-01\n")
    with pytest.raises(DataError, match="MOVIEID"):
        IngestJob(format="netflix", src=tmp_path / "mv_1.txt", out=str(tmp_path / "ev")).run()
    pa_path = tmp_path / "x.parquet"
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"u": [1], "i": [2]}), pa_path)
    with pytest.raises(DataError, match="lacks column"):
        IngestJob(format="interactions", src=pa_path, out=str(tmp_path / "ev")).run()
    assert not (tmp_path / "ev").exists()


def test_rerun_replaces(tmp_path: Path):
    src = tmp_path / "u.data"
    src.write_text("1\t2\t3\t881250949\n")
    out = str(tmp_path / "ev")
    IngestJob(format="movielens", src=src, out=out).run()
    src.write_text("1\t2\t3\t891717742\n")
    IngestJob(format="movielens", src=src, out=out).run()
    assert days(out) == ["dt=1998-04-04"]


@pytest.mark.data
@pytest.mark.parametrize("name,partitioned,has_ts", [("ml-100k", True, True), ("lastfm-hetrec2011", False, False)])
def test_real_interaction_files(shared_data: Path, tmp_path: Path, name: str, partitioned: bool, has_ts: bool):
    import pyarrow.parquet as pq

    src = shared_data / name / "interactions.parquet"
    r = IngestJob(format="interactions", src=src, out=str(tmp_path / "ev")).run()
    t = read_events(r.uri)
    orig = pq.read_table(src)
    assert r.rows == orig.num_rows == t.num_rows and r.partitioned == partitioned
    assert ("event_ts" in t.schema.names) == has_ts
    assert t.schema.field("item_id").type == pa.int64()
    assert sum(t["weight"].to_pylist()) == pytest.approx(sum(orig[orig.schema.names[2]].to_pylist()))


def test_s3_output(tmp_path: Path, s3_bucket: str):
    from pipeline.io.lake import resolve

    (tmp_path / "u.data").write_text("1\t2\t3\t881250949\n1\t3\t4\t891717742\n")
    uri = f"{s3_bucket}/events"
    r = IngestJob(format="movielens", src=tmp_path / "u.data", out=uri).run()
    assert r.uri == uri and resolve(uri).list() == ["dt=1997-12-04", "dt=1998-04-04"]
