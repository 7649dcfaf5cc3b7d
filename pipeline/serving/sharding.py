"""Which shard a user id belongs to: one stable hash shared by the writer of the daily recommendations (the
local inference engine spills events by it) and their readers (a lookup opens only the user's shard file).

The scheme is part of the published data: `_manifest.json` names it, and a reader uses the shard index only
when it knows that name. Changing `user_hash` therefore means a new scheme name (old partitions then fall
back to the per-file user ranges).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

INT_SCHEME = "splitmix64-mod-v1"
STRING_SCHEME = "pandas-siphash-mod-v1"


def scheme_for(user_type: pa.DataType) -> str:
    """The hashing scheme for a user-id type (recorded in the manifest; readers use the same rule)."""
    return INT_SCHEME if pa.types.is_integer(user_type) else STRING_SCHEME


def user_hash(users: pa.Array) -> np.ndarray:
    """A stable uint64 hash of user ids (same id → same shard, across runs, machines and library versions)."""
    if pa.types.is_integer(users.type):
        x = users.to_numpy(zero_copy_only=False).astype(np.uint64)
        x = (x ^ (x >> np.uint64(31))) * np.uint64(0x9E3779B97F4A7C15)  # splitmix-style mixing
        return x ^ (x >> np.uint64(29))
    # pandas' hash_array is SipHash with a fixed key: stable across pandas versions by design
    return pd.util.hash_array(np.asarray(users.to_numpy(zero_copy_only=False), dtype=object)).astype(np.uint64)


def shard_of(users: pa.Array, n_shards: int) -> np.ndarray:
    """[len(users)] shard numbers in [0, n_shards): uint16 when they fit (numpy's stable sort of 16-bit keys is
    a linear radix sort, which the spill relies on), else int64."""
    return (user_hash(users) % np.uint64(n_shards)).astype(np.uint16 if n_shards <= 1 << 16 else np.int64)
