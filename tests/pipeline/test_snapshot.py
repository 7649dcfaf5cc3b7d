"""pipeline.snapshot: the in-memory writer and the one-call loader round-trip; publish replaces, never duplicates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from model.split import strong_generalization_split
from pipeline.errors import DataError
from pipeline.snapshot import MANIFEST, load_snapshot, write_snapshot
from pipeline.synth import synth_interactions


@pytest.fixture(scope="module")
def data():
    f = synth_interactions(300, 80, seed=1)
    x = sp.csr_matrix((np.ones(len(f), np.float32), (f.user_id, f.item_id)), shape=(300, 80))
    split = strong_generalization_split(x, seed=0, n_valid=30, n_test=30)
    user_ids = np.array([f"u{i}" for i in range(x.shape[0])])
    item_ids = np.arange(1000, 1000 + x.shape[1], dtype=np.int64)
    return x, split, user_ids, item_ids


def test_round_trip(tmp_path: Path, data) -> None:
    _, split, user_ids, item_ids = data
    uri = write_snapshot(str(tmp_path / "snap"), user_ids, item_ids, split, {"as_of": "2026-01-01"})
    snap = load_snapshot(uri)
    assert (snap.train != split.train).nnz == 0
    for a, b in ((snap.valid, split.valid), (snap.test, split.test)):
        np.testing.assert_array_equal(a.users, b.users)
        assert (a.fold_in != b.fold_in).nnz == 0 and (a.targets != b.targets).nnz == 0
    np.testing.assert_array_equal(snap.train_users, split.train_users)
    np.testing.assert_array_equal(snap.item_ids, item_ids[split.item_index])
    assert list(snap.user_ids[:3]) == ["u0", "u1", "u2"]
    assert snap.manifest["as_of"] == "2026-01-01" and snap.manifest["counts"]["train_users"] == len(split.train_users)
    np.testing.assert_array_equal(snap.item_popularity(), np.asarray(split.train.sum(0)).ravel())


def test_rewrite_replaces_the_run_and_keeps_one(tmp_path: Path, data) -> None:
    _, split, user_ids, item_ids = data
    root = tmp_path / "snap"
    write_snapshot(str(root), user_ids, item_ids, split)
    first = load_snapshot(str(root)).manifest["run"]
    write_snapshot(str(root), user_ids, item_ids, split)
    second = load_snapshot(str(root)).manifest["run"]
    assert first != second
    assert sorted(p.name for p in root.iterdir()) == sorted([MANIFEST, second])


def test_missing_manifest_and_tampered_file_are_clear_errors(tmp_path: Path, data) -> None:
    _, split, user_ids, item_ids = data
    with pytest.raises(DataError, match="no published snapshot"):
        load_snapshot(str(tmp_path / "nothing"))
    root = tmp_path / "snap"
    write_snapshot(str(root), user_ids, item_ids, split)
    part = next(root.glob("run-*/train/*.parquet"))
    part.write_bytes(part.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(DataError, match="does not match its manifest hash"):
        load_snapshot(str(root))
