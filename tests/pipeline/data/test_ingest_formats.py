"""pipeline.data.ingest: every source format into the events contract; bad inputs leave nothing behind."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from pipeline.data.ingest import IngestJob
from pipeline.errors import DataError
from pipeline.io.output_guard import EVENTS_MARKER


def read_events(uri: str) -> pa.Table:
    return ds.dataset(uri, format="parquet", partitioning="hive").to_table()


def days(uri: str) -> list[str]:
    return sorted(p.name for p in Path(uri).iterdir() if p.name.startswith("dt="))


def test_movielens_csv(tmp_path: Path):
    (tmp_path / "ml").mkdir()  # the output may not lie inside the source folder
    src = tmp_path / "ml" / "ratings.csv"
    src.write_text("userId,movieId,rating,timestamp\n1,31,2.5,1260759144\n1,1029,3.0,1260759179\n2,10,4.0,835355493\n")
    r = IngestJob(format="movielens", src=tmp_path / "ml", out=str(tmp_path / "ev")).run()
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
    src = tmp_path / "training_set"
    src.mkdir()
    (src / "mv_0000001.txt").write_text("1:\n1488844,3,2005-09-06\n822109,5,2005-05-13\n")
    (src / "mv_0000002.txt").write_text("2:\n2059652,4,2005-09-05\n")
    r = IngestJob(format="netflix", src=src, out=str(tmp_path / "ev")).run()
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
    assert r.uri == uri and resolve(uri).list() == [EVENTS_MARKER, "dt=1997-12-04", "dt=1998-04-04"]
    (tmp_path / "u.data").write_text("1\t2\t3\t881250949\n")  # a re-run replaces its own output
    IngestJob(format="movielens", src=tmp_path / "u.data", out=uri).run()
    assert resolve(uri).list() == [EVENTS_MARKER, "dt=1997-12-04"]
    assert resolve(uri).join(EVENTS_MARKER).read_json()["writer"] == "recsys ingest"
    assert not [n for n in resolve(s3_bucket).list() if ".tmp-" in n or ".old-" in n]


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def udata(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.data").write_text("1\t2\t3\t881250949\n1\t3\t4\t891717742\n")
    return folder / "u.data"


def test_refuses_a_foreign_out_a_file_and_a_source_inside_out(tmp_path: Path):
    """The old job rmtree'd --out: a foreign folder, the source inside it, or a file there was lost."""
    src = udata(tmp_path / "work" / "raw")
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "data.parquet").write_bytes(b"someone's")
    (tmp_path / "out.parquet").write_bytes(b"a file")
    before = tree(tmp_path)
    for out, expect in ((tmp_path / "theirs", "not written by recsys ingest"), (tmp_path / "out.parquet", "is a file"),
                        (tmp_path / "work", "contains the source"), (src.parent / "ev", "inside the source folder")):
        with pytest.raises(DataError, match=expect) as e:
            IngestJob(format="movielens", src=src if "inside" not in expect else src.parent, out=str(out)).run()
        assert "\n" not in str(e.value) and "Fix:" in str(e.value)
    assert tree(tmp_path) == before


def test_refuses_synth_output_and_s3_roots(tmp_path: Path, s3_bucket: str):
    from pipeline.data.synth_events import SynthEventsJob
    from pipeline.io.lake import resolve

    SynthEventsJob(users=50, items=40, days=2, out=str(tmp_path / "synth")).run()
    before = tree(tmp_path)
    src = udata(tmp_path / "src")
    with pytest.raises(DataError, match="holds output of 'recsys synth'"):
        IngestJob(format="movielens", src=src, out=str(tmp_path / "synth")).run()
    assert {k: v for k, v in tree(tmp_path).items() if not k.startswith("src")} == before
    resolve(f"{s3_bucket}/events/dt=2024-01-01/x.parquet").write_bytes(b"theirs")
    for out, expect in ((s3_bucket, "bucket root"), (f"{s3_bucket}/events", "not written by")):
        with pytest.raises(DataError, match=expect):
            IngestJob(format="movielens", src=src, out=out).run()
    assert resolve(f"{s3_bucket}/events/dt=2024-01-01/x.parquet").read_bytes() == b"theirs"


def interactions(tmp_path: Path, users: list, items: list | None = None, name: str = "i.parquet", **cols) -> Path:
    import pyarrow.parquet as pq

    path = tmp_path / "src" / name
    path.parent.mkdir(exist_ok=True)
    items = items if items is not None else list(range(len(users)))
    pq.write_table(pa.table({"user_id": users, "item_id": items, **cols}), path)
    return path


def test_unicode_and_slash_ids_go_through(tmp_path: Path):
    src = interactions(tmp_path, ["ünï/1", "日本/ユーザー", "a b"], ["x/y", "é", "ok"])
    r = IngestJob(format="interactions", src=src, out=str(tmp_path / "ev")).run()
    t = read_events(r.uri)
    assert sorted(t["user_id"].to_pylist()) == sorted(["ünï/1", "日本/ユーザー", "a b"])
    (tmp_path / "msd").mkdir()
    (tmp_path / "msd" / "train_triplets.txt").write_text("ünï/1\tSO/1\t3\n")
    r = IngestJob(format="msd", src=tmp_path / "msd", out=str(tmp_path / "ev2")).run()
    assert read_events(r.uri)["user_id"].to_pylist() == ["ünï/1"]


@pytest.mark.parametrize("users,expect", [
    (["ok", "bad\x01id", "x"], r"invalid user_id 'bad\\x01id' at row 2 .*control character U\+0001"),
    (["ok", "x", ""], "invalid user_id '' at row 3 .*it is empty"),
    (["ok", "u" * 257], "at row 2 .*257 characters long"),
    (["ok", "bad\x85"], r"at row 2 .*U\+0085"),
    ([1, None, 3], "user_id is missing at row 2"),
    (pa.array([1, 2**63], pa.uint64()), "user_id 9223372036854775808 at row 2 .*outside the int64 range"),
    ([1.0, 2.5], r"user_id 2.5 at row 2 .*not an integer"),
    (pa.array([True, False]), "user_id in .* has type bool"),
])
def test_ids_outside_the_id_rule_are_refused_with_their_row(tmp_path: Path, users, expect: str):
    src = interactions(tmp_path, users)
    with pytest.raises(DataError, match=expect) as e:
        IngestJob(format="interactions", src=src, out=str(tmp_path / "ev")).run()
    assert "\n" not in str(e.value) and "Fix:" in str(e.value) and str(src) in str(e.value)
    assert not (tmp_path / "ev").exists() and not list(tmp_path.glob(".ev*"))


def test_whole_float_ids_become_int64(tmp_path: Path):
    r = IngestJob(format="interactions", src=interactions(tmp_path, [1.0, 2.0]), out=str(tmp_path / "ev")).run()
    assert read_events(r.uri).schema.field("user_id").type == pa.int64()


def test_a_bad_id_in_a_later_block_names_its_row_and_writes_nothing(tmp_path: Path, monkeypatch):
    from pipeline.data import ingest

    monkeypatch.setattr(ingest, "BLOCK_BYTES", 16)  # a few lines per block: the bad one is in a later block
    (tmp_path / "msd").mkdir()
    lines = [f"user{k}\tsong{k}\t1\n" for k in range(40)]
    lines[33] = "us\x7fer\tsong\t1\n"
    (tmp_path / "msd" / "train_triplets.txt").write_text("".join(lines))
    with pytest.raises(DataError, match=r"invalid user_id 'us\\x7fer' at row 34 of"):
        IngestJob(format="msd", src=tmp_path / "msd", out=str(tmp_path / "ev")).run()
    assert not (tmp_path / "ev").exists() and not list(tmp_path.glob(".ev*"))


def test_event_times(tmp_path: Path):
    """Unix seconds and timestamps (ns truncated, naive taken as UTC) are read; milliseconds taken for seconds,
    strings and floats are refused with the row or the column."""
    import datetime as dt

    ns = pa.array([dt.datetime(2024, 1, 2, 3, 4, 5, 123456)], pa.timestamp("ns"))
    r = IngestJob(format="interactions", src=interactions(tmp_path, [1], name="ns.parquet", event_ts=ns),
                  out=str(tmp_path / "ev")).run()
    t = read_events(r.uri)
    assert t["event_ts"].to_pylist() == [dt.datetime(2024, 1, 2, 3, 4, 5, 123456, tzinfo=dt.UTC)]
    assert days(r.uri) == ["dt=2024-01-02"]
    bad = {
        "ms": (dict(timestamp=[1_700_000_000, 1_700_000_000_000]), "event time at row 2 .*outside the years 1-9999"),
        "overflow": (dict(timestamp=[1, 10**16]), "overflow"),
        "string": (dict(event_ts=["2024-01-01", "2024-01-02"]), "event_ts in .* has type string"),
        "float": (dict(timestamp=[1.5, 2.5]), "timestamp in .* has type double"),
        "null": (dict(timestamp=[1_700_000_000, None]), "event time is missing at row 2"),
        "weight": (dict(weight=["a", "b"]), "weight in .* has type string, not a number"),
    }
    for name, (cols, expect) in bad.items():
        src = interactions(tmp_path, [1, 2], name=f"{name}.parquet", **cols)
        with pytest.raises(DataError, match=expect):
            IngestJob(format="interactions", src=src, out=str(tmp_path / name)).run()
        assert not (tmp_path / name).exists()


def test_netflix_movie_id_beyond_int64(tmp_path: Path):
    (tmp_path / "nf").mkdir()
    (tmp_path / "nf" / "mv_1.txt").write_text(f"{2**63}:\n1,3,2005-01-01\n")
    with pytest.raises(DataError, match="outside the int64 range"):
        IngestJob(format="netflix", src=tmp_path / "nf", out=str(tmp_path / "ev")).run()
