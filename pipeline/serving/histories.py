"""One shard's histories as CSR rows: the spilled (user_id, column) rows of a shard → its distinct users,
sorted, and each user's known columns, sorted and deduplicated (users whose every item is unknown stay, with
an empty row, for the popularity fallback). The local engine's input to scoring and to the output checks.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import pyarrow as pa


def shard_histories(table: pa.Table) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """Spilled (user_id, col) rows → (distinct users sorted, indptr, known cols per user, deduplicated).

    One sort of (user, col + 1) keys does it all: distinct users are the runs of the high bits, col + 1 == 0
    marks an event whose item the model lacks (its user stays active, for the fallback). Integer ids within a
    2^32 range go straight into the key; others are numbered first (pd.factorize). np.unique(return_inverse)
    was 5x slower here: it argsorts, and numpy's argsort is not vectorized like its sort."""
    users = table.column("user_id").combine_chunks()
    cols = table.column("col").to_numpy()
    decode: Callable[[np.ndarray], pa.Array]
    if pa.types.is_integer(users.type):
        u = users.to_numpy()
        lo, hi = (int(u.min()), int(u.max())) if len(u) else (0, 0)
        if hi - lo < 1 << 32:
            ukey = u - np.int64(lo)
            decode = lambda k: pa.array(k + lo, pa.int64())  # noqa: E731
        else:
            ukey, cats = pd.factorize(u, sort=True)
            decode = lambda k: pa.array(cats[k], pa.int64())  # noqa: E731
    else:
        ukey, cats = pd.factorize(np.asarray(users.to_numpy(zero_copy_only=False), dtype=object), sort=True)
        decode = lambda k: pa.array(cats[k].astype(str), pa.string())  # noqa: E731
    key = np.sort((ukey.astype(np.int64) << 31) | (cols.astype(np.int64) + 1))
    if len(key) > 1:
        key = key[np.r_[True, key[1:] != key[:-1]]]  # dedup (user, item)
    high, low = key >> 31, key & ((1 << 31) - 1)
    starts = np.flatnonzero(np.r_[True, high[1:] != high[:-1]]) if len(key) else np.zeros(0, np.int64)
    known = low != 0
    # After the dedup a user has at most one unknown entry (low == 0), and it sorts first in the user's run.
    # Counting from the run starts avoids a cumsum + bincount over every event (0.78 -> 0.59 s on a 226k-user shard).
    lengths = np.diff(np.r_[starts, len(key)]) - ~known[starts]
    indptr = np.zeros(len(starts) + 1, np.int64)
    np.cumsum(lengths, out=indptr[1:])
    return decode(high[starts]), indptr, (low[known] - 1).astype(np.int32)
