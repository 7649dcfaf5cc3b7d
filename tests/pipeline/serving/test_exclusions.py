"""pipeline.serving.exclusions: per-user exclusion lists read and checked, and lists restricted with them
(pipeline.serving.availability.restrict's `blocked`)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import DataError
from pipeline.serving.availability import restrict
from pipeline.serving.exclusions import load_exclusions

DAY = dt.date(2026, 3, 2)
VOCAB = pa.array([10, 11, 12, 13, 14, 15], pa.int64())  # column c is item 10 + c


def write(path: Path, users: list, items: list) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"user_id": pa.array(users, pa.int64()), "item_id": pa.array(items, pa.int64())}), path)
    return str(path)


def test_pairs_are_mapped_deduplicated_and_the_rest_counted(tmp_path: Path) -> None:
    uri = write(tmp_path / "x.parquet", [1, 1, 1, 2, 2, None, 3], [12, 12, 99, 10, None, 11, 15])
    ex = load_exclusions(uri, DAY, VOCAB)
    assert sorted(zip(ex.users.to_pylist(), ex.cols.tolist(), strict=True)) == [(1, 2), (2, 0), (3, 5)]
    st = ex.stats()
    assert (st["exclusions"], st["exclusions_listed"], st["exclusions_unknown_items"], st["exclusions_duplicates"],
            st["exclusions_null_ids"]) == (3, 5, 1, 1, 2)


def test_for_users_gives_each_rows_columns_in_the_shards_order(tmp_path: Path) -> None:
    ex = load_exclusions(write(tmp_path / "x.parquet", [7, 5, 7, 9], [14, 10, 11, 13]), DAY, VOCAB)
    indptr, cols = ex.for_users(pa.array([5, 6, 7], pa.int64()))  # user 9 is in another shard
    assert indptr.tolist() == [0, 1, 1, 3] and cols.tolist() == [0, 1, 4]
    indptr, cols = ex.for_users(pa.array(["a", "b"]))  # ids that cannot be compared match nobody, without an error
    assert indptr.tolist() == [0, 0, 0] and len(cols) == 0


def test_new_titles_of_the_extended_vocabulary_are_known_and_split_off(tmp_path: Path) -> None:
    """Against the model's items plus the day's new ones (cold_items.extend_vocab), a new title is a column
    n_items + j, not an unknown item; split_blocked hands those to the cold merge as indices j."""
    from pipeline.serving.cold_items import split_blocked

    ext = pa.concat_arrays([VOCAB, pa.array([20, 21], pa.int64())])  # new items 20, 21: columns 6, 7
    uri = write(tmp_path / "x.parquet", [1, 1, 2, 3, 3], [21, 11, 20, 99, 12])
    assert load_exclusions(uri, DAY, VOCAB).stats()["exclusions_unknown_items"] == 3
    ex = load_exclusions(uri, DAY, ext)
    assert (ex.stats()["exclusions"], ex.stats()["exclusions_unknown_items"]) == (4, 1)
    blocked = ex.for_users(pa.array([1, 2, 3, 4], pa.int64()))
    assert blocked[0].tolist() == [0, 2, 3, 4, 4] and blocked[1].tolist() == [1, 7, 6, 2]
    (w_ptr, w_cols), (c_ptr, c_cols) = split_blocked(blocked, len(VOCAB))
    assert (w_ptr.tolist(), w_cols.tolist()) == ([0, 1, 1, 2, 2], [1, 2])
    assert (c_ptr.tolist(), c_cols.tolist()) == ([0, 1, 2, 2, 2], [1, 0])
    (w_ptr, w_cols), (c_ptr, c_cols) = split_blocked((np.array([0, 1, 1]), np.array([3])), len(VOCAB))
    assert (w_ptr.tolist(), w_cols.tolist(), c_ptr.tolist(), len(c_cols)) == ([0, 1, 1], [3], [0, 0, 0], 0)


def test_an_empty_list_is_a_no_op(tmp_path: Path) -> None:
    ex = load_exclusions(write(tmp_path / "x.parquet", [], []), DAY, VOCAB)
    assert ex.stats()["exclusions"] == 0 and ex.for_users(pa.array([1, 2], pa.int64()))[0].tolist() == [0, 0, 0]


@pytest.mark.parametrize(("case", "message"), [
    ("missing", "no exclusion list at"),
    ("no-user-column", "lacks user_id"),
    ("future", "is dated 2026-03-03, after the job's date 2026-03-02"),
    ("bad-date", "has an invalid date"),
    ("not-parquet", "cannot read the exclusion list"),
])
def test_bad_lists_are_clear_errors(tmp_path: Path, case: str, message: str) -> None:
    uri = str(tmp_path / "nothing-here")
    if case == "no-user-column":
        uri = str(tmp_path / "x.parquet")
        pq.write_table(pa.table({"item_id": pa.array([10], pa.int64())}), uri)
    elif case == "future":
        uri = write(tmp_path / "exclusions" / "dt=2026-03-03" / "x.parquet", [1], [10]).rsplit("/", 1)[0]
    elif case == "bad-date":
        uri = write(tmp_path / "exclusions" / "dt=2026-02-30" / "x.parquet", [1], [10]).rsplit("/", 1)[0]
    elif case == "not-parquet":
        uri = str(tmp_path / "x.parquet")
        Path(uri).write_text("user_id,item_id\n1,10\n")
    with pytest.raises(DataError, match=message) as e:
        load_exclusions(uri, DAY, VOCAB)
    assert "Fix:" in str(e.value) and "\n" not in str(e.value)


def test_restrict_removes_blocked_items_and_backfills_without_them() -> None:
    # two users, 6 items, k = 3; each row is the model's ranking of unseen items (k' = 5 candidates)
    top = np.array([[0, 1, 2, 3, 4], [5, 4, 3, 2, 1]])
    scores = np.array([[9, 8, 7, 6, 5], [9, 8, 7, 6, 5]], np.float32)
    seen_indptr, seen_cols = np.array([0, 1, 2]), np.array([5, 0])
    pop = np.arange(6)  # popularity order 0..5
    mask = np.ones(6, bool)
    blocked = (np.array([0, 2, 2]), np.array([0, 2]))  # user 0 blocks items 0 and 2; user 1 nothing
    t, s, backfilled, short = restrict(top, scores, 3, mask, pop, seen_indptr, seen_cols, 3, blocked=blocked)
    assert t[0].tolist() == [1, 3, 4] and t[1].tolist() == [5, 4, 3]  # model order kept, blocked gone
    assert (backfilled, short) == (0, 0)
    # with an availability mask too, user 0 has only item 1 left from the model: backfill skips blocked 0 and 2,
    # seen 5 and unavailable 3, 4, and finds nothing else: a short list
    mask = np.array([True, True, True, False, False, True])
    t, s, backfilled, short = restrict(top, scores, 3, mask, pop, seen_indptr, seen_cols, 3, blocked=blocked)
    assert t[0][s[0] > -np.inf].tolist() == [1] and short >= 1
    assert not set(t[0][s[0] > -np.inf].tolist()) & {0, 2}
    assert t[1][s[1] > -np.inf].tolist() == [5, 2, 1]


def test_restrict_backfills_a_blocked_users_short_list_from_popular_unblocked_items() -> None:
    top = np.array([[0, 1, 2]])  # k' = k = 3, every candidate blocked
    scores = np.array([[3, 2, 1]], np.float32)
    blocked = (np.array([0, 3]), np.array([0, 1, 2]))
    t, s, backfilled, short = restrict(top, scores, 3, np.ones(6, bool), np.array([0, 1, 2, 3, 4, 5]),
                                       np.array([0, 1]), np.array([3]), 3, blocked=blocked)
    assert t[0][s[0] > -np.inf].tolist() == [4, 5] and s[0][2] == -np.inf  # 3 seen, 0-2 blocked: 2 items left
    assert (backfilled, short) == (1, 1)
