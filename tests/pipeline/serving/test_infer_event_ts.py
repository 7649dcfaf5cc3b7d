"""Which events make a date's histories, at the boundary: an event_ts that is not a timestamp (ISO strings, integer
epochs) is refused in both engines, in every file of a folder, instead of being skipped (which put events after the
date into its histories); dates and windows at the calendar's ends are one DataError line or a normal run, never an
OverflowError."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from infer_support import run_infer, tiny_bundle

from pipeline.errors import DataError
from pipeline.io.bundle import ModelBundle
from pipeline.serving.job import InferJob
from pipeline.serving.recs import read_recommendations

DAY = dt.date(2024, 5, 3)
BEFORE = [dt.datetime(2024, 5, 1, 10), dt.datetime(2024, 5, 2, 23, 59), dt.datetime(2024, 5, 3, 23, 59, 59)]
AFTER = [dt.datetime(2024, 5, 4, 0, 0, 1), dt.datetime(2024, 5, 9, 12)]


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    return tiny_bundle()


def events(bundle: ModelBundle, ts: pa.Array | None = None) -> pa.Table:
    """One event per user: users 0-2 up to DAY, users 100-101 only after it (they must not be active on DAY)."""
    stamps = BEFORE + AFTER
    items = bundle.item_ids[: len(stamps)].tolist()
    return pa.table({"user_id": pa.array([0, 1, 2, 100, 101], pa.int64()), "item_id": pa.array(items, pa.int64()),
                     "event_ts": ts if ts is not None else pa.array(stamps, pa.timestamp("us", tz="UTC"))})


AS_TEXT = {
    "iso-string": lambda: pa.array([t.isoformat() for t in BEFORE + AFTER]),
    "iso-string-z": lambda: pa.array([t.isoformat() + "Z" for t in BEFORE + AFTER]),
    "epoch-seconds": lambda: pa.array([int(t.replace(tzinfo=dt.UTC).timestamp()) for t in BEFORE + AFTER]),
    "epoch-millis": lambda: pa.array([int(t.replace(tzinfo=dt.UTC).timestamp() * 1000) for t in BEFORE + AFTER]),
    "date": lambda: pa.array([t.date() for t in BEFORE + AFTER], pa.date32()),
}


def job(events_uri: str, out: Path, engine: str = "local", **kw: object) -> InferJob:
    base: dict[str, object] = {"date": DAY, "events": events_uri, "out": str(out), "device": "cpu", "progress": False,
                               "top_n": 5, "engine": engine}
    return InferJob(**(base | kw))  # type: ignore[arg-type]


def listing(out: Path, day: dt.date = DAY) -> list[str]:
    part = out / "recommendations" / f"dt={day}"
    return sorted(p.name for p in part.iterdir()) if part.exists() else []


def test_timestamp_event_ts_keeps_only_events_up_to_the_date(tmp_path: Path, bundle: ModelBundle) -> None:
    path = tmp_path / "events.parquet"
    pq.write_table(events(bundle), path)
    m = run_infer(job(str(path), tmp_path / "out"), bundle, "1")
    assert m["events"] == 3 and m["rows"] == 3
    assert sorted(read_recommendations(str(tmp_path / "out"), DAY)["user_id"].to_pylist()) == [0, 1, 2]


@pytest.mark.parametrize("kind", list(AS_TEXT))
def test_non_timestamp_event_ts_is_refused_not_skipped(tmp_path: Path, bundle: ModelBundle, kind: str) -> None:
    """Before the fix the column was ignored: users 100 and 101, whose only events come after DAY, were published
    in DAY's partition. Now the run is refused and the previous partition of DAY stays what readers see."""
    good, bad = tmp_path / "good.parquet", tmp_path / "bad.parquet"
    pq.write_table(events(bundle), good)
    pq.write_table(events(bundle, AS_TEXT[kind]()), bad)
    out = tmp_path / "out"
    first = run_infer(job(str(good), out), bundle, "good")
    with pytest.raises(DataError, match=r"events column event_ts has type (string|int64|date32\[day\]) in .*bad\.parquet, "
                                        r"not a timestamp.*Fix: store event_ts as a Parquet timestamp"):
        run_infer(job(str(bad), out), bundle, "bad")
    assert listing(out) == [first["run"]]
    got = read_recommendations(str(out), DAY)
    assert sorted(got["user_id"].to_pylist()) == [0, 1, 2] and set(got["model_version"].to_pylist()) == {"good"}


def mixed_folder(tmp_path: Path, bundle: ModelBundle) -> str:
    """dt= folders whose first file has a timestamp event_ts and whose later file an integer epoch: a dataset takes
    the first file's schema and used to read the epochs as microseconds (1970), keeping the future events."""
    t = events(bundle)
    root = tmp_path / "mixed"
    (root / "dt=2024-05-01").mkdir(parents=True)
    (root / "dt=2024-05-09").mkdir()
    pq.write_table(t.slice(0, 3), root / "dt=2024-05-01" / "a.parquet")
    later = t.slice(3).set_column(2, "event_ts", pa.array([int(x.replace(tzinfo=dt.UTC).timestamp()) for x in AFTER]))
    pq.write_table(later, root / "dt=2024-05-09" / "b.parquet")
    return str(root)


def test_one_file_with_an_integer_event_ts_in_a_folder_is_refused(tmp_path: Path, bundle: ModelBundle) -> None:
    with pytest.raises(DataError, match=r"event_ts has type int64 in .*mixed \(file .*dt=2024-05-09/b\.parquet\)"):
        run_infer(job(mixed_folder(tmp_path, bundle), tmp_path / "out", history_days=30), bundle, "1")
    assert listing(tmp_path / "out") == []


def test_spark_engine_refuses_the_same_files(tmp_path: Path, bundle: ModelBundle, spark) -> None:
    bad = tmp_path / "bad.parquet"
    pq.write_table(events(bundle, AS_TEXT["iso-string"]()), bad)
    for uri, message in ((str(bad), r"event_ts has type string in .*bad\.parquet, not a timestamp"),
                         (mixed_folder(tmp_path, bundle), r"event_ts has type int64 in .*b\.parquet")):
        with pytest.raises(DataError, match=message):
            run_infer(job(uri, tmp_path / "out", engine="spark"), bundle, "1")
    assert listing(tmp_path / "out") == []


@pytest.mark.slow
def test_spark_engine_keeps_only_events_up_to_the_date(tmp_path: Path, bundle: ModelBundle, spark) -> None:
    path = tmp_path / "events.parquet"
    pq.write_table(events(bundle), path)
    m = run_infer(job(str(path), tmp_path / "out", engine="spark"), bundle, "1")
    assert m["events"] == 3 and m["rows"] == 3
    assert sorted(read_recommendations(str(tmp_path / "out"), DAY)["user_id"].to_pylist()) == [0, 1, 2]


# -- the calendar's ends ---------------------------------------------------------------------------------------------

def test_windows_before_the_calendar_are_one_clear_error(tmp_path: Path, bundle: ModelBundle) -> None:
    path = tmp_path / "events.parquet"
    pq.write_table(events(bundle), path)
    for date, days, most in ((dt.date.min, 2, 1), (dt.date(1, 1, 3), 4, 3), (DAY, 10**12, 739009)):
        with pytest.raises(DataError, match=rf"--history-days {days} ending at --date {date} starts before 0001-01-01\. "
                                            rf"Fix: pass --history-days {most} or less"):
            run_infer(job(str(path), tmp_path / "out", date=date, history_days=days), bundle, "1")
    with pytest.raises(DataError, match="no events up to 0001-01-01"):  # a one-day window at the first day is valid
        run_infer(job(str(path), tmp_path / "out", date=dt.date.min, history_days=1), bundle, "1")
    assert not (tmp_path / "out" / "recommendations").exists()


@pytest.mark.parametrize("unit", ["us", "ns"])
def test_dates_at_and_beyond_the_timestamp_range(tmp_path: Path, bundle: ModelBundle, unit: str) -> None:
    """9999-12-31 has no day after it; timestamp[ns] ends in 2262 and starts in 1677: the cut-offs stay integers."""
    path = tmp_path / "events.parquet"
    t = events(bundle)
    pq.write_table(t.set_column(2, "event_ts", t["event_ts"].cast(pa.timestamp(unit, tz="UTC"))), path)
    m = run_infer(job(str(path), tmp_path / "max", date=dt.date.max), bundle, "1")
    assert m["events"] == 5  # every event is up to 9999-12-31
    m = run_infer(job(str(path), tmp_path / "far", date=dt.date(2300, 1, 1), history_days=400 * 366), bundle, "1")
    assert m["events"] == 5
    for date, days in ((dt.date.max, 3), (dt.date(1600, 1, 1), None), (dt.date(2300, 1, 1), 10)):
        with pytest.raises(DataError, match=f"no events up to {date}"):
            run_infer(job(str(path), tmp_path / "none", date=date, history_days=days), bundle, "1")
    assert not (tmp_path / "none").exists()


def test_cli_dates_at_the_calendar_ends(tmp_path: Path, bundle: ModelBundle, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.cli.main import main

    path = tmp_path / "events.parquet"
    pq.write_table(events(bundle), path)
    model = bundle.save(tmp_path / "bundle")
    base = ["infer", "--events", str(path), "--out", str(tmp_path / "out"), "--model", str(model), "--device", "cpu",
            "--no-progress"]
    for argv, message in ((["--date", "0001-01-01", "--history-days", "2"], "starts before 0001-01-01"),
                          (["--date", "9999-12-31", "--history-days", "7"], "no events up to 9999-12-31"),
                          (["--date", "2024-05-03", "--history-days", str(10**18)], "starts before 0001-01-01")):
        assert main(base + argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err and "Overflow" not in err
    assert not (tmp_path / "out" / "recommendations").exists()


def test_spark_engine_at_the_calendar_ends(tmp_path: Path, bundle: ModelBundle, spark) -> None:
    path = tmp_path / "events.parquet"
    pq.write_table(events(bundle), path)
    with pytest.raises(DataError, match="no events up to 9999-12-31"):
        run_infer(job(str(path), tmp_path / "out", engine="spark", date=dt.date.max, history_days=3), bundle, "1")
    with pytest.raises(DataError, match="starts before 0001-01-01"):
        run_infer(job(str(path), tmp_path / "out", engine="spark", date=dt.date.min, history_days=2), bundle, "1")
    assert not (tmp_path / "out" / "recommendations").exists()


def test_files_whose_columns_disagree_are_one_clear_error(tmp_path: Path, bundle: ModelBundle) -> None:
    """A later file whose user ids are text where the first file's are integers: a DataError, not Arrow's error."""
    t = events(bundle)
    root = tmp_path / "events"
    (root / "dt=2024-05-01").mkdir(parents=True)
    (root / "dt=2024-05-02").mkdir()
    pq.write_table(t.slice(0, 2), root / "dt=2024-05-01" / "a.parquet")
    pq.write_table(t.slice(2, 1).set_column(0, "user_id", pa.array(["alice"])), root / "dt=2024-05-02" / "b.parquet")
    with pytest.raises(DataError, match=r"cannot read the events at .*events: .*Fix: give every events file the same "
                                        r"columns and types"):
        run_infer(job(str(root), tmp_path / "out"), bundle, "1")
    assert listing(tmp_path / "out") == []
