"""pipeline.serving.checks.check_part on synthetic shards, chunk by chunk: rows in any order pass, and a repeated or
seen item is caught wherever it sits (first chunk, a later chunk, the last user)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.serving import checks
from pipeline.serving.checks import OutputCheckError, check_part
from pipeline.serving.scoring import to_table

N_ITEMS, K = 30, 5


def shard(n_users: int = 23, seed: int = 0) -> tuple[pa.Array, np.ndarray, np.ndarray, np.ndarray, np.ndarray, pa.Array]:
    """Histories and a correct top-K per user (best unseen items of random scores)."""
    rng = np.random.default_rng(seed)
    seen = [np.sort(rng.choice(N_ITEMS, int(rng.integers(0, 10)), replace=False)) for _ in range(n_users)]
    indptr = np.r_[0, np.cumsum([len(s) for s in seen])].astype(np.int64)
    cols = np.concatenate(seen).astype(np.int32)
    scores = rng.random((n_users, N_ITEMS)).astype(np.float32)
    for u, s in enumerate(seen):
        scores[u, s] = -np.inf
    top = np.argsort(-scores, axis=1)[:, :K]
    return (pa.array(np.arange(n_users) * 3, pa.int64()), indptr, cols, top,
            np.take_along_axis(scores, top, 1), pa.array(np.arange(N_ITEMS, dtype=np.int64) + 100))


@pytest.fixture(params=[1, 4, 1000], ids=["chunk-1", "chunk-4", "one-chunk"])
def chunk(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(checks, "CHECK_CHUNK_USERS", request.param)
    return int(request.param)


def test_correct_output_passes_in_any_row_order(chunk: int) -> None:
    users, indptr, cols, top, scores, vocab = shard()
    fb = np.diff(indptr) == 0
    table = to_table(users, top, scores, fb, vocab, "7")
    check_part(table, users, indptr, cols, vocab, K, "7")
    order = np.random.default_rng(1).permutation(table.num_rows)
    check_part(table.take(pa.array(order)), users, indptr, cols, vocab, K, "7")


@pytest.mark.parametrize("user", [0, 9, 22])
@pytest.mark.parametrize("fault", ["repeat", "seen"])
def test_faults_are_caught_in_every_chunk(chunk: int, user: int, fault: str) -> None:
    users, indptr, cols, top, scores, vocab = shard()
    if fault == "seen":
        if indptr[user + 1] == indptr[user]:  # give the user a history holding their last recommended item
            pytest.skip("user without history in this draw")
        top[user, -1] = cols[indptr[user]]
        message = "already seen"
    else:
        top[user, 1] = top[user, 0]
        message = "repeats an item"
    table = to_table(users, top, scores, np.diff(indptr) == 0, vocab, "7")
    order = np.random.default_rng(2).permutation(table.num_rows)
    with pytest.raises(OutputCheckError, match=message):
        check_part(table.take(pa.array(order)), users, indptr, cols, vocab, K, "7")
