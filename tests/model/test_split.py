"""model.split: strong-generalization split (Liang et al. 2018)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from model.split import HeldOut, Split, SplitError, strong_generalization_split


def random_matrix(n_users: int = 300, n_items: int = 120, seed: int = 0, min_items: int = 5) -> sp.csr_matrix:
    """Binary users × items with min_items..40 distinct items per user, popular items more likely."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, n_items + 1)
    p /= p.sum()
    rows = []
    for _ in range(n_users):
        k = int(rng.integers(min_items, min(40, n_items) + 1))
        row = np.zeros(n_items, dtype=np.float32)
        row[rng.choice(n_items, size=k, replace=False, p=p)] = 1.0
        rows.append(row)
    return sp.csr_matrix(np.vstack(rows))


def row_set(m: sp.csr_matrix, r: int) -> set[int]:
    return set(m.indices[m.indptr[r] : m.indptr[r + 1]].tolist())


@pytest.fixture(scope="module")
def matrix() -> sp.csr_matrix:
    m = random_matrix()
    # Two extra columns nobody trains on: one empty, one used by a single user (dropped unless in train).
    extra = sp.csr_matrix(([1.0], ([5], [1])), shape=(m.shape[0], 2), dtype=np.float32)
    return sp.hstack([m, extra], format="csr")


@pytest.fixture(scope="module")
def split(matrix) -> Split:
    return strong_generalization_split(matrix, seed=42)


def test_users_are_disjoint_and_cover_everyone(matrix, split):
    tr, va, te = set(split.train_users), set(split.valid.users), set(split.test.users)
    assert not tr & va and not tr & te and not va & te
    assert tr | va | te == set(range(matrix.shape[0]))
    for users in (split.train_users, split.valid.users, split.test.users):
        assert np.all(np.diff(users) > 0)  # ascending


def test_counts_fraction_and_absolute(matrix, split):
    assert len(split.valid.users) == 30 and len(split.test.users) == 30
    assert len(split.train_users) == 240
    assert split.train.shape == (240, len(split.item_index))
    s = strong_generalization_split(matrix, seed=1, n_valid=17, n_test=25)
    assert (len(s.valid.users), len(s.test.users), len(s.train_users)) == (17, 25, 258)
    assert s.valid.fold_in.shape[0] == s.valid.targets.shape[0] == 17


def test_train_is_training_rows_restricted_to_kept_items(matrix, split):
    assert matrix.shape[1] - 2 not in split.item_index  # the empty column is always dropped
    expected = matrix[split.train_users][:, split.item_index]
    assert (split.train != expected).nnz == 0
    assert np.all(np.diff(split.train.tocsc().indptr) > 0)  # every kept item is seen in training
    assert np.all(np.diff(split.item_index) > 0)
    for held in (split.valid, split.test):
        assert held.fold_in.shape[1] == held.targets.shape[1] == split.train.shape[1]


def test_targets_are_20_percent_and_partition_the_kept_items(matrix, split):
    kept = set(split.item_index.tolist())
    col_of = {c: j for j, c in enumerate(split.item_index.tolist())}
    for held in (split.valid, split.test):
        for r, user in enumerate(held.users):
            items = {col_of[c] for c in row_set(matrix, user) if c in kept}
            fold_in, targets = row_set(held.fold_in, r), row_set(held.targets, r)
            assert not fold_in & targets
            assert fold_in | targets == items
            n = len(items)
            expected = int(0.2 * n) if int(0.2 * n) > 0 or n < 2 else 1
            assert len(targets) == expected, (user, n)
    # Overall close to 20 %.
    total = split.valid.targets.nnz + split.valid.fold_in.nnz
    assert 0.15 < split.valid.targets.nnz / total <= 0.2


def test_targets_are_random_not_the_first_items(matrix):
    s = strong_generalization_split(matrix, seed=3)
    lowest = 0
    for r in range(s.valid.targets.shape[0]):
        items = sorted(row_set(s.valid.fold_in, r) | row_set(s.valid.targets, r))
        t = row_set(s.valid.targets, r)
        lowest += t == set(items[: len(t)])
    assert lowest < s.valid.targets.shape[0] // 2


def test_short_histories():
    # users 0..9 have 10 items, user 10 has 2 items, user 11 has 1 item (all items seen by the others)
    dense = np.zeros((12, 10), dtype=np.float32)
    dense[:10] = 1.0
    dense[10, [2, 5]] = 1.0
    dense[11, 7] = 1.0
    m = sp.csr_matrix(dense)
    for seed in range(20):
        s = strong_generalization_split(m, seed=seed, n_valid=2, n_test=2)
        for held in (s.valid, s.test):
            for r, user in enumerate(held.users):
                n_t = len(row_set(held.targets, r))
                assert n_t == {10: 1, 11: 0}.get(int(user), 2)


def test_same_seed_same_split_other_seed_other_split(matrix):
    a = strong_generalization_split(matrix, seed=7)
    b = strong_generalization_split(matrix, seed=7)
    c = strong_generalization_split(matrix, seed=8)
    for x, y in ((a.valid, b.valid), (a.test, b.test)):
        np.testing.assert_array_equal(x.users, y.users)
        assert (x.fold_in != y.fold_in).nnz == 0 and (x.targets != y.targets).nnz == 0
    np.testing.assert_array_equal(a.item_index, b.item_index)
    assert set(a.valid.users) != set(c.valid.users)
    assert set(a.test.users) != set(c.test.users)


def test_items_never_seen_in_training_are_dropped():
    rng = np.random.default_rng(0)
    dense = (rng.random((40, 30)) < 0.5).astype(np.float32)
    dense[:, 27:] = 0.0
    dense[0, 27] = 1.0  # item 27: only user 0
    dense[1, 28] = 1.0  # item 28: only user 1
    # item 29: nobody
    m = sp.csr_matrix(dense)
    seen = {True: 0, False: 0}
    for seed in range(12):
        s = strong_generalization_split(m, seed=seed, n_valid=5, n_test=5)
        in_train = {u: u in set(s.train_users.tolist()) for u in (0, 1)}
        assert (27 in s.item_index) == in_train[0]
        assert (28 in s.item_index) == in_train[1]
        assert 29 not in s.item_index
        assert s.train.shape == (len(s.train_users), len(s.item_index))
        seen[in_train[0]] += 1
        # held-out interactions with dropped items are gone from fold-in and targets too
        for held in (s.valid, s.test):
            for r, user in enumerate(held.users):
                got = {int(s.item_index[c]) for c in row_set(held.fold_in, r) | row_set(held.targets, r)}
                assert got == {c for c in row_set(m, user) if c in set(s.item_index.tolist())}
    assert seen[True] and seen[False]  # both cases were exercised


def test_too_small_data_raises():
    m = random_matrix(n_users=5, n_items=20)
    with pytest.raises(SplitError, match=r"at least 1 training user"):
        strong_generalization_split(m, seed=0, n_valid=3, n_test=2)
    with pytest.raises(SplitError, match=r"validation set would have 0 user"):
        strong_generalization_split(m, seed=0, n_valid=0.05, n_test=1)  # round(0.25) == 0
    with pytest.raises(SplitError, match=r"test set would have 1 user.*min_heldout_users=2"):
        strong_generalization_split(m, seed=0, n_valid=2, n_test=1, min_heldout_users=2)
    with pytest.raises(SplitError):
        strong_generalization_split(m, seed=0, n_valid=1.5)
    assert issubclass(SplitError, ValueError)


def test_empty_heldout_targets_raise():
    # Every user has one item of their own: held-out users' items are never seen in training.
    with pytest.raises(SplitError, match=r"no validation user has a target.*0 interaction"):
        eye = sp.identity(10, dtype=np.float32, format="csr")
        strong_generalization_split(eye, seed=0, n_valid=2, n_test=2)
    # Everyone has the same single item: it is kept, but one item cannot be split into fold-in + target.
    ones = sp.csr_matrix(np.ones((10, 1), dtype=np.float32))
    with pytest.raises(SplitError, match=r"no validation user has a target"):
        strong_generalization_split(ones, seed=0, n_valid=2, n_test=2)


def test_types_and_values_carried(matrix, split):
    assert isinstance(split.valid, HeldOut) and isinstance(split.test, HeldOut)
    for m in (split.train, split.valid.fold_in, split.valid.targets, split.test.fold_in, split.test.targets):
        assert sp.issparse(m) and m.format == "csr" and m.dtype == np.float32
        m.check_format(full_check=True)
        assert m.has_sorted_indices
        assert set(np.unique(m.data).tolist()) <= {1.0}
    assert split.valid.users_with_targets().all()
