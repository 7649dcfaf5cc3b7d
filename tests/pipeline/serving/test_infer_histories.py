"""pipeline.serving.histories.shard_histories against a plain-Python reference: integer ids in a compact range, negative
ids, ids spread wider than 2^32 (numbered first), string ids; duplicates, unknown items (-1) and users whose
every item is unknown (they stay active, with an empty history, for the fallback)."""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pytest

from pipeline.serving.histories import shard_histories


def reference(users: list, cols: list[int]) -> tuple[list, list[list[int]]]:
    hist: dict = {}
    for u, c in zip(users, cols, strict=True):
        hist.setdefault(u, set())
        if c >= 0:
            hist[u].add(c)
    order = sorted(hist)
    return order, [sorted(hist[u]) for u in order]


def as_lists(indptr: np.ndarray, cols: np.ndarray) -> list[list[int]]:
    return [cols[a:b].tolist() for a, b in itertools.pairwise(indptr.tolist())]


ID_KINDS = {
    "compact": lambda rng, n: rng.integers(0, 50, n),
    "negative": lambda rng, n: rng.integers(-30, 30, n),
    "wide": lambda rng, n: rng.choice(np.array([-(2**62), -5, 0, 7, 2**40, 2**62]), n),
    "extremes": lambda rng, n: rng.choice(np.array([-(2**63), 2**63 - 1, 0]), n),
}


@pytest.mark.parametrize("kind", list(ID_KINDS))
@pytest.mark.parametrize("seed", range(5))
def test_integer_ids_match_reference(kind: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 400))
    users = ID_KINDS[kind](rng, n).astype(np.int64)
    cols = rng.integers(-1, 12, n).astype(np.int32)  # -1: an item the model lacks; small range: duplicates
    cols[users == users[0]] = -1  # one user with unknown items only
    got_users, indptr, got_cols = shard_histories(pa.table({"user_id": users, "col": cols}))
    want_users, want_hist = reference(users.tolist(), cols.tolist())
    assert got_users.type == pa.int64() and got_users.to_pylist() == want_users
    assert as_lists(indptr, got_cols) == want_hist and got_cols.dtype == np.int32
    assert want_hist[want_users.index(int(users[0]))] == []


@pytest.mark.parametrize("seed", range(3))
def test_string_ids_match_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    names = np.array(["alice", "bob", "u-1", "u-10", "u-2", "Zed", "é"])
    users = rng.choice(names, 200)
    cols = rng.integers(-1, 30, 200).astype(np.int32)
    got_users, indptr, got_cols = shard_histories(pa.table({"user_id": pa.array(users.tolist()), "col": cols}))
    want_users, want_hist = reference(users.tolist(), cols.tolist())
    assert got_users.type == pa.string() and got_users.to_pylist() == want_users
    assert as_lists(indptr, got_cols) == want_hist


def test_large_column_numbers_and_empty_shard() -> None:
    cols = np.array([2**31 - 2, 0, 2**31 - 2, -1], np.int32)
    users, indptr, got = shard_histories(pa.table({"user_id": np.array([3, 3, 3, 4], np.int64), "col": cols}))
    assert users.to_pylist() == [3, 4] and as_lists(indptr, got) == [[0, 2**31 - 2], []]
    users, indptr, got = shard_histories(pa.table({"user_id": pa.array([], pa.int64()), "col": pa.array([], pa.int32())}))
    assert len(users) == 0 and indptr.tolist() == [0] and len(got) == 0
