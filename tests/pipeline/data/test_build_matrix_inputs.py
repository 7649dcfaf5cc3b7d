"""build-matrix's input boundary: damaged or disagreeing event files, event_ts that is not a timestamp, and windows
at the calendar's ends are each one DataError line naming the file (or the folder) and the fix, never a Spark
traceback or an OverflowError, and the snapshot published before stays as it was."""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.build_matrix import BuildMatrixJob
from pipeline.data.synth_events import SynthEventsJob
from pipeline.errors import DataError
from pipeline.io.snapshot import load_snapshot, read_manifest

AS_OF = dt.date(2024, 1, 7)
INT64, FLOAT64, UTC_US = pa.int64(), pa.float64(), pa.timestamp("us", tz="UTC")


def job(events: Path | str, lake: Path | str, **kw) -> BuildMatrixJob:
    base = {"as_of": AS_OF, "window_days": 7, "spark_master": "local[2]", "shuffle_partitions": 2, "seed": 3,
            "n_valid": 20, "n_test": 20}
    return BuildMatrixJob(events=str(events), out=str(lake), **{**base, **kw})


@pytest.fixture(scope="module")
def lake(spark, tmp_path_factory) -> Path:
    """A lake with the snapshot as of AS_OF already published: every bad build below tries to replace it."""
    root = tmp_path_factory.mktemp("inputs")
    SynthEventsJob(users=800, items=300, days=7, out=str(root / "good"), seed=5).run()
    job(root / "good", root / "lake").run()
    return root / "lake"


def published(lake: Path) -> tuple[dict, list[str]]:
    snap = lake / "snapshots" / f"as_of={AS_OF}"
    return read_manifest(str(snap)), sorted(p.name for p in snap.iterdir())


def events(n: int = 3000, seed: int = 0, user_type: pa.DataType = INT64, weight_type: pa.DataType = FLOAT64,
           ts_type: pa.DataType | None = UTC_US) -> pa.Table:
    rng = np.random.default_rng(seed)
    users = rng.integers(0, 200, n)
    cols = {"user_id": pa.array(users.astype(str) if pa.types.is_string(user_type) else users).cast(user_type),
            "item_id": pa.array(rng.integers(0, 100, n), pa.int64()),
            "weight": pa.array(np.ones(n)).cast(weight_type)}
    if ts_type is not None:
        cols["event_ts"] = pa.array(np.full(n, np.datetime64("2024-01-05T12:00:00", "us"))).cast(ts_type)
    return pa.table(cols)


def parquet_bytes(table: pa.Table, **kw) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, **kw)
    return buf.getvalue()


def bad_folders(root: Path) -> dict[str, tuple[Path, str, str]]:
    """name -> (events folder, the file the message must name, what it must say)."""
    good = parquet_bytes(events())
    footer = bytearray(good)
    size = int.from_bytes(good[-8:-4], "little")
    footer[-8 - size:-8] = b"\xfe" * size  # the Thrift footer garbled, its length and magic bytes intact
    cases: dict[str, dict[str, bytes]] = {
        "corrupt": {"part-1.parquet": bytes(footer)},
        "truncated": {"part-1.parquet": good[: len(good) // 2]},
        "csv": {"part-1.parquet": b"user_id,item_id\n1,2\n3,4\n"},
        "empty": {"part-1.parquet": b""},
        "mixed_ids": {"part-1.parquet": parquet_bytes(events(user_type=pa.string()))},
        "no_item_id": {"part-1.parquet": parquet_bytes(events().drop_columns(["item_id"]))},
        "no_event_ts": {"part-1.parquet": parquet_bytes(events(ts_type=None))},
        "string_ts": {"part-1.parquet": parquet_bytes(events(ts_type=None).append_column(
            "event_ts", pa.array(["2024-01-05 12:00:00"] * 3000)))},
        "epoch_ts": {"part-1.parquet": parquet_bytes(events(ts_type=None).append_column(
            "event_ts", pa.array(np.full(3000, 1_704_456_000), pa.int64())))},
        "nanos_ts": {"part-1.parquet": parquet_bytes(events(ts_type=pa.timestamp("ns")))},
        "uint64_ids": {"part-1.parquet": parquet_bytes(events(user_type=pa.uint64()))},
        "int_and_float_weights": {"part-1.parquet": parquet_bytes(events(weight_type=pa.int64()))},
    }
    expect = {
        "corrupt": "is not a readable Parquet file", "truncated": "is not a readable Parquet file",
        "csv": "is not a readable Parquet file", "empty": r"is empty \(0 bytes\)",
        "mixed_ids": "disagree on the type of user_id: int64 in .*part-0.parquet, string in",
        "no_item_id": "lacks column", "no_event_ts": "disagree on column event_ts",
        "string_ts": "schema failed .*event_ts has type string", "epoch_ts": "schema failed .*event_ts has type int",
        "nanos_ts": r"event_ts has type timestamp\[ns\]", "uint64_ids": "user_id has type uint64",
        "int_and_float_weights": "disagree on the type of weight",
    }
    out = {}
    for name, files in cases.items():
        folder = root / name
        folder.mkdir(parents=True)
        (folder / "part-0.parquet").write_bytes(good)
        for fname, data in files.items():
            (folder / fname).write_bytes(data)
        named = "part-0.parquet" if name in ("no_event_ts",) else "part-1.parquet"
        out[name] = (folder, named, expect[name])
    return out


def test_bad_files_are_one_line_and_publish_nothing(lake: Path, tmp_path: Path):
    before = published(lake)
    for name, (folder, named, expect) in bad_folders(tmp_path).items():
        with pytest.raises(DataError, match=expect) as e:
            job(folder, lake).run()
        msg = str(e.value)
        assert "\n" not in msg and "Fix:" in msg, name
        assert named in msg or name == "no_event_ts", (name, msg)
        assert "Exception" not in msg and "py4j" not in msg.lower(), name
    assert published(lake) == before
    assert load_snapshot(str(lake / "snapshots" / f"as_of={AS_OF}")).train.nnz > 0


def test_string_and_epoch_event_ts_are_refused_in_a_partitioned_lake_too(lake: Path, tmp_path: Path):
    """Item 2: event_ts is never compared as text or as a number: a string or an integer epoch is refused."""
    before = published(lake)
    for name, col in (("string", pa.array(["2024-01-05 12:00:00"] * 3000)),
                      ("epoch", pa.array(np.full(3000, 1_704_456_000), pa.int64()))):
        day = tmp_path / name / "dt=2024-01-05"
        day.mkdir(parents=True)
        pq.write_table(events(ts_type=None).append_column("event_ts", col), day / "part-0.parquet")
        with pytest.raises(DataError, match=f"events file .*{name}/dt=2024-01-05/part-0.parquet: schema failed"):
            job(tmp_path / name, lake).run()
    assert published(lake) == before


def test_a_damaged_data_page_is_one_line_naming_the_file(lake: Path, tmp_path: Path):
    """The footer reads fine (pyarrow's check passes); Spark fails decoding a page: its error becomes one line."""
    folder = tmp_path / "pages"
    folder.mkdir()
    good = parquet_bytes(events(), compression="zstd")
    (folder / "part-0.parquet").write_bytes(good)
    damaged = bytearray(parquet_bytes(events(seed=1), compression="zstd"))
    damaged[4:68] = b"\xff" * 64  # the first page header
    (folder / "part-1.parquet").write_bytes(bytes(damaged))
    pq.ParquetFile(folder / "part-1.parquet")  # the footer is intact
    before = published(lake)
    with pytest.raises(DataError, match=r"Spark could not read events file .*part-1.parquet \(FAILED_READ_FILE") as e:
        job(folder, lake).run()
    assert "\n" not in str(e.value) and "Fix:" in str(e.value)
    assert published(lake) == before


def test_files_that_differ_only_in_width_or_zone_are_read_alike(spark, tmp_path: Path):
    """int32 and int64 ids, float32 and float64 weights, naive and UTC timestamps across files: Spark alone fails
    on the second file (it takes one file's schema); the job reads every file with one schema. Hidden files and
    folders ('.', '_') are skipped, as every reader does."""
    folder = tmp_path / "ev"
    folder.mkdir()
    a = events(seed=1, user_type=pa.int32(), weight_type=pa.float32(), ts_type=pa.timestamp("us"))
    b = events(seed=2, ts_type=pa.timestamp("ms", tz="UTC"))
    pq.write_table(a, folder / "part-0.parquet")
    pq.write_table(b, folder / "part-1.parquet")
    (folder / ".part-2.parquet.tmp-0").write_bytes(b"half written")
    (folder / "_staging").mkdir()
    (folder / "_staging" / "x.parquet").write_bytes(b"junk")
    r = job(folder, tmp_path / "lake", min_user_interactions=1).run()
    assert r.counts["events_read"] == a.num_rows + b.num_rows
    assert read_manifest(r.snapshot_uri)["counts"]["events_in_window"] == a.num_rows + b.num_rows


@pytest.mark.parametrize("as_of,window,expect", [
    ("0001-01-01", "28", "starts before the calendar's first day"),
    ("9999-12-31", "28", "is the calendar's last day"),
    ("2024-01-07", str(10**9), "starts before the calendar's first day"),
    ("2024-01-07", str(10**12), "starts before the calendar's first day"),
])
def test_calendar_extremes_are_one_line(tmp_path: Path, capsys, as_of: str, window: str, expect: str):
    from pipeline.cli.main import main

    rc = main(["build-matrix", "--events", str(tmp_path), "--as-of", as_of, "--window-days", window,
               "--out", str(tmp_path / "lake")])
    err = capsys.readouterr().err
    assert rc == 2 and expect in err and len(err.strip().splitlines()) == 1 and "Overflow" not in err
    assert not (tmp_path / "lake").exists()


def test_first_calendar_day_with_a_one_day_window_is_fine(tmp_path: Path):
    """0001-01-01 itself is a valid as-of (window 1 day): no overflow, just no events there."""
    cfg = job(tmp_path, tmp_path / "lake", as_of=dt.date(1, 1, 1), window_days=1)
    assert cfg.window_start == dt.date(1, 1, 1) and cfg.window_end == dt.date(1, 1, 2)
    day = tmp_path / "ev" / "dt=2024-01-05"
    day.mkdir(parents=True)
    pq.write_table(events(), day / "part-0.parquet")
    with pytest.raises(DataError, match="zero_events failed"):
        job(tmp_path / "ev", tmp_path / "lake", as_of=dt.date(1, 1, 1), window_days=1).run()


def test_out_that_is_a_file_and_a_corrupt_previous_manifest(tmp_path: Path):
    day = tmp_path / "ev" / "dt=2024-01-05"
    day.mkdir(parents=True)
    pq.write_table(events(), day / "part-0.parquet")
    (tmp_path / "lake.txt").write_text("not a lake")
    with pytest.raises(DataError, match="is a file, not a lake folder"):
        job(tmp_path / "ev", tmp_path / "lake.txt").run()
    assert (tmp_path / "lake.txt").read_text() == "not a lake"
    prev = tmp_path / "lake" / "snapshots" / "as_of=2023-12-31"
    prev.mkdir(parents=True)
    (prev / "manifest.json").write_text("{broken")
    with pytest.raises(DataError, match=r"previous snapshot's manifest .*as_of=2023-12-31/manifest.json is not valid"):
        job(tmp_path / "ev", tmp_path / "lake").run()
    assert (prev / "manifest.json").read_text() == "{broken"


def test_s3_events_name_the_object(tmp_path: Path, s3_bucket: str):
    from pipeline.io.lake import resolve

    resolve(f"{s3_bucket}/ev/dt=2024-01-05/part-0.parquet").write_bytes(parquet_bytes(events()))
    resolve(f"{s3_bucket}/ev/dt=2024-01-06/part-0.parquet").write_bytes(b"user_id,item_id\n1,2\n")
    with pytest.raises(DataError, match=f"events file {s3_bucket}/ev/dt=2024-01-06/part-0.parquet is not a readable"):
        job(f"{s3_bucket}/ev", tmp_path / "lake").run()
    assert not (tmp_path / "lake").exists()
