"""The items contract: validation errors, the empty-tags no-op, and the dated, swapped-in-whole publish."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.items import ITEMS_MARKER, ItemsIngestJob, read_items, validate_items
from pipeline.errors import DataError

DAY = dt.date(2024, 3, 5)


def _items(**cols: list) -> pa.Table:
    base = {"item_id": [1, 2, 3], "title": ["a", "b", "c"], "tags": [["Drama", " comedy "], [], ["drama"]]}
    base.update(cols)
    return pa.table(base)


def test_valid_items_are_normalised_and_empty_tags_are_kept_as_a_no_op() -> None:
    t = validate_items(_items(tags=[["Drama", " comedy ", "", "drama"], None, ["x"]]))
    assert t.column_names[:3] == ["item_id", "title", "tags"]
    assert t.column("tags").to_pylist() == [["drama", "comedy"], [], ["x"]]
    assert t.column("item_id").type == pa.int64()


@pytest.mark.parametrize("ids, needle", [
    ([1, None, 3], "missing on row 2"),
    ([1, 2, 1], "appears 2 times"),
    ([1, -2, 3], "negative"),
    (["a", "", "c"], "empty"),
])
def test_bad_ids_are_data_errors(ids: list, needle: str) -> None:
    with pytest.raises(DataError, match=needle) as e:
        validate_items(_items(item_id=ids))
    assert e.value.fix


def test_missing_id_column_and_no_metadata_at_all_are_errors() -> None:
    with pytest.raises(DataError, match="no item_id column"):
        validate_items(pa.table({"id": [1], "tags": [["a"]]}))
    with pytest.raises(DataError, match="no item has tags or free text"):
        validate_items(_items(tags=[[], None, []]))
    # free text alone is metadata enough
    assert validate_items(_items(tags=[[], [], []], plot=["a thief", None, ""])).num_rows == 3


def test_non_utf8_text_is_refused_in_binary_parquet_and_csv(tmp_path: Path) -> None:
    bad = pa.table({"item_id": [1, 2], "title": pa.array([b"ok", b"caf\xe9"], pa.binary()), "tags": [["a"], ["b"]]})
    with pytest.raises(DataError, match="'title' holds text that is not valid UTF-8"):
        validate_items(bad)
    csv = tmp_path / "items.csv"
    csv.write_bytes(b"item_id,title,tags\n1,ok,a|b\n2,caf\xe9,c\n")
    with pytest.raises(DataError, match="not valid UTF-8"):
        read_items(csv)


def test_csv_tags_are_pipe_separated(tmp_path: Path) -> None:
    csv = tmp_path / "items.csv"
    csv.write_text("item_id,title,tags\n1,Heat,Crime|Thriller\n2,Up,\n", encoding="utf-8")
    t = read_items(csv)
    assert t.column("tags").to_pylist() == [["crime", "thriller"], []]


def test_ingest_publishes_a_dated_version_and_a_bad_file_leaves_it(tmp_path: Path) -> None:
    src = tmp_path / "src.parquet"
    pq.write_table(_items(), src)
    lake = tmp_path / "lake"
    r = ItemsIngestJob(src=src, lake=str(lake), date=DAY).run()
    day = lake / "items" / f"dt={DAY}"
    assert r.rows == 3 and r.items_with_tags == 2
    assert (day / ITEMS_MARKER).exists()
    assert read_items(day / "items.parquet").column("item_id").to_pylist() == [1, 2, 3]
    # a re-run with a duplicated id fails before anything is written: the day's version is unchanged
    pq.write_table(_items(item_id=[1, 1, 2]), src)
    with pytest.raises(DataError, match="appears 2 times"):
        ItemsIngestJob(src=src, lake=str(lake), date=DAY).run()
    assert read_items(day / "items.parquet").column("item_id").to_pylist() == [1, 2, 3]
    assert [p.name for p in (lake / "items").iterdir()] == [f"dt={DAY}"]  # no staging folder left behind


@pytest.mark.data
def test_shared_items_files_follow_the_contract(shared_data: Path) -> None:
    for name in ("ml-100k", "anime"):
        path = shared_data / name / "items.parquet"
        if path.exists():
            t = read_items(path)
            assert t.num_rows > 1000 and t.column("tags").type == pa.list_(pa.string())


def test_cli_ingest_items_and_its_date_rules(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.cli.main import main

    src = tmp_path / "src.parquet"
    pq.write_table(_items(), src)
    lake = tmp_path / "lake"
    assert main(["ingest", "--format", "items", "--src", str(src), "--out", str(lake), "--date", DAY.isoformat()]) == 0
    assert "ingested 3 items (2 with tags)" in capsys.readouterr().out
    assert read_items(lake / "items" / f"dt={DAY}" / "items.parquet").num_rows == 3
    # items without --date, events with --date: one clear line each, nothing written
    assert main(["ingest", "--format", "items", "--src", str(src), "--out", str(tmp_path / "l2")]) == 2
    assert "--format items needs --date. Fix: pass --date" in capsys.readouterr().err
    assert main(["ingest", "--format", "interactions", "--src", str(src), "--out", str(tmp_path / "ev"),
                 "--date", DAY.isoformat()]) == 2
    assert "--date applies to --format items only" in capsys.readouterr().err
    assert not (tmp_path / "l2").exists() and not (tmp_path / "ev").exists()
