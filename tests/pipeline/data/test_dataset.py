"""pipeline.data.dataset: every bad input is a DataError that names the problem and the fix."""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.dataset import (
    BinarizeRule,
    Interactions,
    available_datasets,
    load_dataset,
    prepare,
    read_interactions,
    resolve_dataset,
    validate_interactions,
)
from pipeline.errors import DataError

REPO_ROOT = Path(__file__).resolve().parents[3]
DATA_DIR = Path(os.environ.get("RECSYS_DATA_DIR", REPO_ROOT / ".." / "shared" / "data"))
ANY = BinarizeRule()


def write(path: Path, table: pa.Table | pd.DataFrame) -> Path:
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, preserve_index=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def good_frame(n_users: int = 4, per_user: int = 5, offset: int = 0) -> pd.DataFrame:
    """Users offset..offset+n_users-1, user u has items u..u+per_user-1."""
    users = np.repeat(np.arange(offset, offset + n_users), per_user)
    items = users + np.tile(np.arange(per_user), n_users)
    return pd.DataFrame({"user_id": users.astype(np.int64), "item_id": items.astype(np.int64)})


def load_error(tmp_path: Path, frame_or_table, **kwargs) -> str:
    path = write(tmp_path / "bad.parquet", frame_or_table)
    with pytest.raises(DataError) as info:
        load_dataset(path, tmp_path, kwargs.pop("rule", ANY), **kwargs)
    message = str(info.value)
    assert "Fix:" in message
    return message


# ------------------------------------------------------------------------------------------ bad inputs


def test_empty_file_with_schema(tmp_path):
    table = pa.table({"user_id": pa.array([], pa.int32()), "item_id": pa.array([], pa.int32())})
    message = load_error(tmp_path, table)
    assert "zero rows" in message
    assert "export" in message


def test_zero_byte_file_is_not_parquet(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"")
    with pytest.raises(DataError, match=r"not a readable Parquet file") as info:
        load_dataset(path, tmp_path, ANY)
    assert "re-export" in str(info.value)


def test_missing_columns_names_found_columns(tmp_path):
    frame = good_frame().rename(columns={"user_id": "uid"})
    message = load_error(tmp_path, frame)
    assert "user_id" in message and "uid" in message  # the missing one and what was found
    assert "item_id" not in message.split("columns found")[0]  # only the missing one is called missing
    assert "rename" in message


def test_missing_columns_in_a_frame():
    with pytest.raises(DataError, match=r"lack column.*item_id.*columns found: user_id, x"):
        validate_interactions(pd.DataFrame({"user_id": [1], "x": [2]}))


def test_nan_ids_are_counted(tmp_path):
    frame = good_frame().astype({"user_id": "float64"})
    frame.loc[[0, 3], "user_id"] = np.nan
    message = load_error(tmp_path, frame)
    assert "user_id has 2 missing" in message
    assert "drop the rows" in message


def test_null_integer_ids(tmp_path):
    table = pa.table(
        {"user_id": pa.array([1, None, 2], pa.int32()), "item_id": pa.array([1, 2, 3], pa.int32())}
    )
    assert "user_id has 1 missing" in load_error(tmp_path, table)


def test_fractional_ids(tmp_path):
    frame = good_frame().astype({"item_id": "float64"})
    frame.loc[2, "item_id"] = 1.5
    message = load_error(tmp_path, frame)
    assert "item_id has 1 non-integer" in message and "1.5" in message
    assert "int64" in message


def test_whole_float_ids_are_cast_to_int64():
    frame = good_frame().astype({"user_id": "float64", "item_id": "float64"})
    clean = validate_interactions(frame)
    assert clean["user_id"].dtype == np.int64 and clean["item_id"].dtype == np.int64


def test_negative_ids(tmp_path):
    frame = good_frame()
    frame.loc[0, "item_id"] = -7
    message = load_error(tmp_path, frame)
    assert "negative" in message and "-7" in message
    assert "non-negative" in message and "remap" in message


def test_mixed_string_and_number_ids_rejected():
    frame = pd.DataFrame({"user_id": ["a", 3], "item_id": [1, 2]})
    with pytest.raises(DataError, match=r"mixes strings.*Fix: ids must be all int64 or all strings"):
        validate_interactions(frame)


def test_nan_rating(tmp_path):
    frame = good_frame().assign(rating=4.0)
    frame.loc[1, "rating"] = np.nan
    message = load_error(tmp_path, frame, rule=BinarizeRule(min_rating=4))
    assert "rating has 1 missing" in message


def test_rule_asks_for_a_column_that_does_not_exist(tmp_path):
    message = load_error(tmp_path, good_frame(), rule=BinarizeRule(min_weight=1.0))
    assert "min_weight" in message and "no weight column" in message
    assert "remove min_weight" in message


def test_rule_that_keeps_nothing(tmp_path):
    message = load_error(tmp_path, good_frame().assign(rating=3.0), rule=BinarizeRule(min_rating=4))
    assert "no interaction passes" in message and "lower" in message


def test_all_users_below_the_filter(tmp_path):
    frame = good_frame(n_users=3, per_user=4)
    message = load_error(tmp_path, frame, min_user_interactions=5)
    assert "min_user_interactions=5" in message
    assert "all 3 user(s) had fewer" in message
    assert "lower min_user_interactions" in message


def test_path_traversal_name_is_rejected(tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    write(data_dir / "toy" / "interactions.parquet", good_frame())
    write(tmp_path / "secret" / "interactions.parquet", good_frame())  # data_dir/../secret
    write(tmp_path / "interactions.parquet", good_frame())  # data_dir/..
    cwd = tmp_path / "a" / "b"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)  # relative paths are resolved here, never inside data_dir
    for bad in ("../etc", "..", "../secret", "toy/../../secret", "../../../../../../no-such-dir/x"):
        with pytest.raises(DataError) as info:
            load_dataset(bad, data_dir, ANY)
        assert "toy" in str(info.value), bad  # the fix lists what is available
        assert "Fix:" in str(info.value)
    with pytest.raises(DataError, match=r"neither a data set name"):
        resolve_dataset("../etc", data_dir)
    if Path("/etc/passwd").is_file():
        with pytest.raises(DataError, match=r"not a Parquet file"):
            resolve_dataset("/etc/passwd", data_dir)


def test_unknown_name_lists_available(tmp_path):
    data_dir = tmp_path / "data"
    write(data_dir / "toy" / "interactions.parquet", good_frame())
    write(data_dir / "other" / "interactions.parquet", good_frame())
    (data_dir / "not-a-dataset").mkdir()
    with pytest.raises(DataError, match=r"unknown data set 'nope'.*Fix: use one of .*: other, toy"):
        load_dataset("nope", data_dir, ANY)
    assert available_datasets(data_dir) == ["other", "toy"]


def test_missing_data_dir_points_at_the_setting(tmp_path):
    with pytest.raises(DataError, match=r"does not exist.*RECSYS_DATA_DIR"):
        resolve_dataset("ml-1m", tmp_path / "absent")


def test_non_parquet_file_and_folder_without_interactions(tmp_path):
    csv = tmp_path / "x.csv"
    csv.write_text("user_id,item_id\n1,2\n")
    with pytest.raises(DataError, match=r"not a Parquet file"):
        resolve_dataset(str(csv), tmp_path)
    folder = tmp_path / "sub" / "dir"
    folder.mkdir(parents=True)
    with pytest.raises(DataError, match=r"has no interactions.parquet"):
        resolve_dataset(str(folder), tmp_path)


def test_data_error_is_value_error_and_pickles():
    err = DataError("thing is broken", "repair it")
    assert isinstance(err, ValueError)
    assert str(err) == "thing is broken. Fix: repair it."
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) and again.fix == "repair it"


# ------------------------------------------------------------------------------------------ resolution


def test_resolve_name_file_and_folder(tmp_path):
    data_dir = tmp_path / "data"
    target = write(data_dir / "toy" / "interactions.parquet", good_frame())
    loose = write(tmp_path / "loose.parquet", good_frame())
    assert resolve_dataset("toy", data_dir) == target
    assert resolve_dataset(str(loose), data_dir) == loose
    assert resolve_dataset(str(data_dir / "toy"), tmp_path) == target


def test_read_drops_other_columns_and_decodes_dictionaries(tmp_path):
    table = pa.table(
        {
            "user_id": pa.array(["u1", "u2"]).dictionary_encode(),
            "item_id": pa.array([3, 4], pa.int32()),
            "split": pa.array(["train", "test"]).dictionary_encode(),
            "weight": pa.array([1, 2], pa.int32()),
        }
    )
    df = read_interactions(write(tmp_path / "t.parquet", table))
    assert list(df.columns) == ["user_id", "item_id", "weight"]
    assert df["user_id"].tolist() == ["u1", "u2"]


# ------------------------------------------------------------------------------------------ behaviour


def test_duplicates_are_collapsed_counted_and_warned(tmp_path, caplog):
    frame = good_frame(n_users=2, per_user=5)
    frame = pd.concat([frame, frame.iloc[[0, 0, 7]]], ignore_index=True)  # 3 extra copies
    path = write(tmp_path / "dup.parquet", frame)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.dataset"):
        data = load_dataset(path, tmp_path, ANY)
    assert data.stats["duplicates_removed"] == 3
    assert data.stats["rows_read"] == 13
    assert data.matrix.nnz == 10
    assert set(data.matrix.data.tolist()) == {1.0}
    assert any("3 duplicate" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_users_below_filter_are_dropped(tmp_path):
    frame = pd.concat([good_frame(n_users=2, per_user=5), good_frame(n_users=1, per_user=4, offset=100)])
    data = load_dataset(write(tmp_path / "f.parquet", frame), tmp_path, ANY, min_user_interactions=5)
    assert data.user_ids.tolist() == [0, 1]
    assert data.stats["users_dropped"] == 1
    assert data.stats["users_before_filter"] == 3
    assert data.item_ids.tolist() == list(range(6))  # items of the dropped user (100..103) are gone
    assert np.all(np.diff(data.matrix.indptr) >= 5)


def test_binarize_rule_on_ratings(tmp_path):
    frame = pd.DataFrame(
        {
            "user_id": [7, 7, 7, 7, 7, 7, 3, 3, 3, 3, 3],
            "item_id": [10, 11, 12, 13, 14, 15, 10, 11, 12, 13, 14],
            "rating": [5.0, 4.0, 3.5, 4.5, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 0.5],
            "timestamp": np.arange(11),
        }
    )
    path = write(tmp_path / "r.parquet", frame)
    data = load_dataset(path, tmp_path, BinarizeRule(min_rating=4), min_user_interactions=4)
    assert data.stats["rows_after_binarize"] == 9  # 3.5 and 0.5 are not positives
    assert data.user_ids.tolist() == [3, 7]  # sorted by external id
    assert data.item_ids.tolist() == [10, 11, 12, 13, 14, 15]
    expected = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 0, 1, 1, 1]], dtype=np.float32)
    np.testing.assert_array_equal(data.matrix.toarray(), expected)
    assert data.matrix.dtype == np.float32
    # A higher threshold drops user 3 (no 5-star) via the filter, and with it item 12.
    strict = load_dataset(path, tmp_path, BinarizeRule(min_rating=4.5), min_user_interactions=1)
    assert strict.user_ids.tolist() == [7] and strict.item_ids.tolist() == [10, 13]


def test_binarize_rule_on_weights():
    frame = good_frame(n_users=2, per_user=6).assign(weight=[1, 2, 3, 4, 5, 6] * 2)
    data = prepare(frame, BinarizeRule(min_weight=2), min_user_interactions=5)
    assert data.matrix.nnz == 10 and data.stats["rows_after_binarize"] == 10


def test_matrix_layout_and_string_ids():
    frame = pd.DataFrame(
        {
            "user_id": ["b"] * 5 + ["a"] * 5,
            "item_id": ["x", "y", "z", "w", "v", "v", "w", "q", "r", "s"],
        }
    )
    data = prepare(frame, ANY, min_user_interactions=5)
    assert isinstance(data, Interactions)
    assert data.user_ids.tolist() == ["a", "b"]
    assert data.item_ids.tolist() == sorted(set(frame["item_id"]))
    m = data.matrix
    assert m.dtype == np.float32 and m.has_sorted_indices
    m.check_format(full_check=True)
    for row, user in enumerate(data.user_ids):
        expected = set(frame.loc[frame["user_id"] == user, "item_id"])
        assert set(data.item_ids[m[row].indices]) == expected


def test_min_user_interactions_must_be_positive():
    with pytest.raises(DataError, match=r"min_user_interactions"):
        prepare(good_frame(), ANY, min_user_interactions=0)


# ------------------------------------------------------------------------------------------ real data


@pytest.mark.data
def test_real_ml_latest_small():
    if not (DATA_DIR / "ml-latest-small" / "interactions.parquet").is_file():
        pytest.skip(f"real data absent: no ml-latest-small in {DATA_DIR} (set RECSYS_DATA_DIR)")
    data = load_dataset("ml-latest-small", DATA_DIR, BinarizeRule(min_rating=4.0))
    counts = np.diff(data.matrix.indptr)
    assert counts.min() >= 5
    s = data.stats
    assert s["rows_read"] == 100_004
    assert 40_000 < s["rows_after_binarize"] < 60_000  # about half the ratings are >= 4
    assert 600 <= data.n_users <= 671
    assert 5_000 <= data.n_items <= 9_066
    assert data.matrix.nnz == s["nnz"] == counts.sum()
    assert np.all(np.diff(data.user_ids) > 0) and np.all(np.diff(data.item_ids) > 0)
    assert set(data.matrix.data.tolist()) == {1.0}
