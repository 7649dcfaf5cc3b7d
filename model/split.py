"""Strong-generalization split (Liang et al. 2018): held-out users never appear in training.

Protocol, as implemented by ``strong_generalization_split``:

1. Shuffle the users with ``np.random.default_rng(seed)``. The first ``n_train`` of the permutation
   train, the next ``n_valid`` are validation users, the last ``n_test`` are test users (Liang's order).
2. Train on the training users only. Items = the columns with at least one training interaction; the
   other columns are removed from ``train``, ``fold_in`` and ``targets`` alike (``item_index`` holds the
   kept original column ids, so column c of every output is column ``item_index[c]`` of the input).
   Held-out users' interactions with dropped items are discarded *before* the 80/20 split, as in Liang.
3. For each held-out user with n remaining items, ``n_targets = floor(target_fraction * n)`` items,
   chosen uniformly at random, are targets; the rest are the fold-in input. This is Liang's
   ``int(0.2 * n)`` for every user with n >= 5 (with target_fraction = 0.2). Deviation for short
   histories: where the floor is 0 but n >= 2 the user gets 1 target (Liang puts all items of users
   with < 5 items into fold-in); n = 1 keeps its item as fold-in, n = 0 leaves both rows empty. Users
   without a target stay in the held-out set; evaluation skips them.

Rows of every output are in ascending original-row order (``train_users``, ``valid.users``,
``test.users`` are sorted). Values of the input are carried over unchanged. Same seed, same split.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp


class SplitError(ValueError):
    """The data cannot be split as asked (too few users, empty held-out sets, bad arguments)."""


@dataclass(frozen=True, eq=False)
class HeldOut:
    """Held-out users: ``fold_in`` is the model input, ``targets`` are the items to rank.

    Row r of ``fold_in``/``targets`` is original row ``users[r]``; columns are the kept items
    (``Split.item_index``), the same columns as ``Split.train``.
    """

    fold_in: sp.csr_matrix
    targets: sp.csr_matrix
    users: np.ndarray  # int64 row indices into the original matrix, ascending

    @property
    def n_users(self) -> int:
        return len(self.users)

    def users_with_targets(self) -> np.ndarray:
        """Boolean mask over rows: which held-out users have at least one target."""
        return np.diff(self.targets.indptr) > 0


@dataclass(frozen=True, eq=False)
class Split:
    train: sp.csr_matrix  # training users × kept items
    valid: HeldOut
    test: HeldOut
    train_users: np.ndarray  # int64 row indices into the original matrix, ascending
    item_index: np.ndarray  # int64 original column ids of the kept items, ascending

    @property
    def n_items(self) -> int:
        return len(self.item_index)


def heldout_count(name: str, value: int | float, n_users: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SplitError(f"{name} must be a user count (int) or a fraction (float), got {value!r}")
    if isinstance(value, numbers.Integral):
        count = int(value)
        if count < 0:
            raise SplitError(f"{name}={count} is negative; give a count >= 1 or a fraction in (0, 1)")
        return count
    if not 0.0 < float(value) < 1.0:
        raise SplitError(f"{name}={value!r} as a fraction must be in (0, 1); pass an int for a user count")
    return round(float(value) * n_users)


def _split_rows(
    rows: sp.csr_matrix, target_fraction: float, rng: np.random.Generator
) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Per row, a random floor(target_fraction * n) entries (1 if that is 0 and n >= 2) become targets."""
    n_rows = rows.shape[0]
    lengths = np.diff(rows.indptr).astype(np.int64)
    n_targets = np.floor(target_fraction * lengths).astype(np.int64)  # Liang: int(0.2 * n)
    n_targets[(n_targets == 0) & (lengths >= 2)] = 1
    row_of = np.repeat(np.arange(n_rows, dtype=np.int64), lengths)
    keys = rng.random(rows.nnz)
    order = np.lexsort((keys, row_of))  # entries of each row in random order, rows kept together
    rank = np.empty(rows.nnz, dtype=np.int64)
    rank[order] = np.arange(rows.nnz, dtype=np.int64) - rows.indptr[row_of[order]]
    is_target = rank < n_targets[row_of]

    def pick(mask: np.ndarray) -> sp.csr_matrix:
        indptr = np.zeros(n_rows + 1, dtype=np.int64)
        np.cumsum(np.bincount(row_of[mask], minlength=n_rows), out=indptr[1:])
        out = sp.csr_matrix((rows.data[mask], rows.indices[mask], indptr), shape=rows.shape)
        out.has_sorted_indices = rows.has_sorted_indices
        return out

    return pick(~is_target), pick(is_target)


def strong_generalization_split(
    matrix: sp.csr_matrix,
    seed: int,
    n_valid: int | float = 0.1,
    n_test: int | float = 0.1,
    target_fraction: float = 0.2,
    min_heldout_users: int = 1,
) -> Split:
    """Split ``matrix`` (users × items) by users: train / validation / test (see module doc).

    ``n_valid``/``n_test``: an int is a number of users, a float in (0, 1) a fraction of all users
    (rounded). Raises ``SplitError`` when there are fewer users than n_valid + n_test + 1, when a
    held-out set would have fewer than ``min_heldout_users`` users or no user with a target, or when
    training has no interactions.
    """
    if not sp.issparse(matrix) or matrix.ndim != 2:
        raise SplitError(f"matrix must be a 2-D scipy sparse matrix (users × items), got {type(matrix)}")
    if not 0.0 < float(target_fraction) < 1.0:
        raise SplitError(f"target_fraction={target_fraction!r} must be in (0, 1); the protocol uses 0.2")
    if min_heldout_users < 1:
        raise SplitError(f"min_heldout_users={min_heldout_users} must be >= 1")
    csr = sp.csr_matrix(matrix)
    csr.sum_duplicates()  # also sorts indices
    n_users, n_cols = csr.shape

    nv = heldout_count("n_valid", n_valid, n_users)
    nt = heldout_count("n_test", n_test, n_users)
    for name, count in (("validation", nv), ("test", nt)):
        if count < min_heldout_users:
            raise SplitError(
                f"the {name} set would have {count} user(s) out of {n_users}, fewer than "
                f"min_heldout_users={min_heldout_users}; use more users or a larger n_valid/n_test"
            )
    n_train = n_users - nv - nt
    if n_train < 1:
        raise SplitError(
            f"{n_users} user(s) cannot hold {nv} validation + {nt} test users and at least 1 training "
            f"user; use a data set with more than {nv + nt} users or smaller n_valid/n_test"
        )

    rng = np.random.default_rng(seed)
    perm = rng.permutation(n_users).astype(np.int64)
    train_users = np.sort(perm[:n_train])
    valid_users = np.sort(perm[n_train : n_train + nv])
    test_users = np.sort(perm[n_train + nv :])

    train_all = csr[train_users]
    item_index = np.flatnonzero(np.bincount(train_all.indices, minlength=n_cols) > 0).astype(np.int64)
    if len(item_index) == 0:
        raise SplitError(
            f"the {n_train} training user(s) have no interactions, so no item is left; "
            "use a data set where training users have interactions (filter users with < 5 first)"
        )
    train = train_all[:, item_index]
    train.sort_indices()

    def held_out(users: np.ndarray, name: str) -> HeldOut:
        rows = csr[users][:, item_index]
        rows.sort_indices()
        fold_in, targets = _split_rows(rows, float(target_fraction), rng)
        if targets.nnz == 0:
            raise SplitError(
                f"no {name} user has a target item after dropping items unseen in training "
                f"({len(users)} user(s), {rows.nnz} interaction(s) left); use users with >= 2 items "
                "(the protocol keeps users with >= 5) or more held-out users"
            )
        return HeldOut(fold_in=fold_in, targets=targets, users=users)

    valid = held_out(valid_users, "validation")
    test = held_out(test_users, "test")
    return Split(train=train, valid=valid, test=test, train_users=train_users, item_index=item_index)
