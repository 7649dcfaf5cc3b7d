"""pipeline.serving.recs: readers trust only the Delta table's committed files, resolve 'latest', and validate outside input."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
from infer_support import events_table, tiny_bundle, write_events

from pipeline.errors import DataError
from pipeline.io import lake
from pipeline.io.dates import parse_date
from pipeline.io.publish import PartitionWriter
from pipeline.serving.job import InferJob, publish_recommendations
from pipeline.serving.recs import committed_dates, read_recommendations, user_recommendations


@pytest.fixture(scope="module")
def lake_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lake")
    events = write_events(events_table(n_users=30), str(root / "events"))
    b = tiny_bundle()
    for day in ("2024-05-01", "2024-05-02"):
        job = InferJob(date=dt.date.fromisoformat(day), events=events, out=str(root), device="cpu", top_n=5,  # type: ignore[arg-type]
                       progress=False)
        publish_recommendations(job, b, f"v-{day}")
    # a newer date staged but never committed (a run that died before its commit: files, no log entry), a stray folder
    part = root / "recommendations" / "dt=2024-05-03"
    shutil.copytree(root / "recommendations" / "dt=2024-05-02", part)
    (root / "recommendations" / "dt=garbage").mkdir()
    return root


def test_only_committed_partitions_are_read(lake_root: Path) -> None:
    assert committed_dates(str(lake_root)) == [dt.date(2024, 5, 2), dt.date(2024, 5, 1)]
    latest = read_recommendations(str(lake_root), "latest")
    assert set(latest["model_version"].to_pylist()) == {"v-2024-05-02"}
    assert (latest.schema.metadata or {})[b"dt"] == b"2024-05-02"
    with pytest.raises(DataError, match="no committed recommendations for 2024-05-03"):
        read_recommendations(str(lake_root), "2024-05-03")
    with pytest.raises(DataError, match="no committed recommendations for 2023-01-01"):
        read_recommendations(str(lake_root), dt.date(2023, 1, 1))
    with pytest.raises(DataError, match="no committed recommendations under"):
        read_recommendations(str(lake_root / "empty"), "latest")


def test_user_filter_and_one_user(lake_root: Path) -> None:
    a, b = sorted(read_recommendations(str(lake_root), "2024-05-01")["user_id"].to_pylist())[:2]
    t = read_recommendations(str(lake_root), "2024-05-01", user_ids=[a, str(b), 10_000])
    assert sorted(t["user_id"].to_pylist()) == [a, b]
    r = user_recommendations(str(lake_root), "latest", str(a))
    assert r["date"] == "2024-05-02" and r["user_id"] == a and len(r["items"]) == 5
    scores = [s for _, s in r["items"]]
    assert scores == sorted(scores, reverse=True)
    with pytest.raises(DataError, match="has no recommendations"):
        user_recommendations(str(lake_root), "latest", "424242")
    with pytest.raises(DataError, match="integer user ids"):
        read_recommendations(str(lake_root), "latest", user_ids=["alice"])


@pytest.mark.parametrize("bad", ["2024-13-01", "2024-02-30", "24-01-01", "2024/01/01", "", "latest2", "2024-01-01; x"])
def test_bad_dates(bad: str) -> None:
    with pytest.raises(DataError):
        parse_date(bad)


@pytest.mark.parametrize("bad", ["", "x" * 257, "u\n1", "a\x00b", "\x85", True, None, 1.5, 2**63])
def test_bad_user_ids_are_refused_before_any_read(tmp_path: Path, bad: object) -> None:
    """The readers take exactly the ids pipeline.io.ids.check_id takes (the rule of ingestion and inference)."""
    _publish(tmp_path, "2024-05-01", pa.array(["a"]))
    with pytest.raises(DataError, match=r"invalid user id|outside the int64 range"):
        read_recommendations(str(tmp_path), "latest", user_ids=[bad])
    with pytest.raises(DataError, match=r"invalid user id|outside the int64 range"):
        user_recommendations(str(tmp_path), "latest", bad)


def test_ids_the_old_reader_refused_are_read(tmp_path: Path) -> None:
    """Spaces, '/', unicode, 256 characters: accepted at ingestion and published, so they must be readable."""
    odd = ["a b", "../x", "ünï/1", "x" * 256, "用户", "42", "007"]
    _publish(tmp_path, "2024-05-01", pa.array(odd))
    for u in odd:  # kept as given: only the partition's type decides what "007" means
        assert user_recommendations(str(tmp_path), "latest", u)["user_id"] == u
    assert sorted(read_recommendations(str(tmp_path), "latest", user_ids=odd)["user_id"].to_pylist()) == sorted(odd)


def _publish(root: Path, day: str, users: pa.Array) -> None:
    n = len(users)
    table = pa.table({"user_id": users, "item_ids": pa.array([[1, 2]] * n, pa.list_(pa.int64())),
                      "scores": pa.array([[0.5, 0.25]] * n, pa.list_(pa.float32())),
                      "model_version": pa.array(["v"] * n), "fallback": pa.array([False] * n)})
    w = PartitionWriter(lake.resolve(root / "recommendations" / f"dt={day}"))
    w.write_part(table)
    w.commit({"model_version": "v"})


def test_string_user_ids_are_matched_exactly(tmp_path: Path) -> None:
    _publish(tmp_path, "2024-05-01", pa.array(["007", "7", "-1", "alice"]))
    for asked, found in ((["007"], ["007"]), (["7"], ["7"]), ([7], ["7"]), (["-1", "alice"], ["-1", "alice"])):
        assert sorted(read_recommendations(str(tmp_path), "latest", user_ids=asked)["user_id"].to_pylist()) == found
    assert user_recommendations(str(tmp_path), "latest", "007")["user_id"] == "007"


def test_integer_user_ids_across_the_int64_range(tmp_path: Path) -> None:
    top, low = 2**63 - 1, -(2**63)
    _publish(tmp_path, "2024-05-01", pa.array([low, -5, 7, top], pa.int64()))
    asked = [str(top), "-5", "007", low]  # digit strings of any length, with a sign, leading zeros
    assert sorted(read_recommendations(str(tmp_path), "latest", user_ids=asked)["user_id"].to_pylist()) == [low, -5, 7, top]
    assert user_recommendations(str(tmp_path), "latest", str(top))["user_id"] == top
    log = tmp_path / "recommendations" / "_delta_log"
    before = sorted(p.name for p in log.iterdir())
    for bad in ([str(top + 1)], [top + 1], [str(low - 1)], [1, 2**70]):
        with pytest.raises(DataError, match=r"outside the int64 range.*Fix: pass the user id as stored"):
            read_recommendations(str(tmp_path), "latest", user_ids=bad)
    for bad_id in ("7a", "-", "1-2", "+7", "3; rm -rf /"):  # valid ids, but not integers
        with pytest.raises(DataError, match=r"not an integer, but this partition has integer user ids\. Fix: pass integer"):
            read_recommendations(str(tmp_path), "latest", user_ids=[bad_id])
    with pytest.raises(DataError, match="outside the int64 range"):
        user_recommendations(str(tmp_path), "latest", 2**64)
    assert sorted(p.name for p in log.iterdir()) == before  # a read changes nothing


def test_cli_recs_errors(lake_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.cli.main import main

    u = read_recommendations(str(lake_root), "2024-05-01")["user_id"][0].as_py()
    assert main(["recs", "--date", "2024-05-01", "--user", str(u), "--out", str(lake_root), "--json"]) == 0
    assert f'"user_id": {u}' in capsys.readouterr().out
    assert main(["recs", "--date", "2024-02-31", "--user", "1", "--out", str(lake_root)]) == 2
    assert "not a calendar date" in capsys.readouterr().err
    assert main(["recs", "--date", "2024-05-03", "--user", "1", "--out", str(lake_root)]) == 2
    assert "no committed" in capsys.readouterr().err
    assert main(["recs", "--user", "1", "--out", "ftp://x/y"]) == 2
