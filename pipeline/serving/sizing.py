"""How big the units of work are: users per scoring batch (from the memory budget), events per shard, and
how many shards the local engine keeps in flight. Pure arithmetic shared by both engines; nothing here reads
data or touches a device.
"""

from __future__ import annotations

import os

from pipeline.errors import DataError

SHARD_EVENTS_MAX = 4_000_000  # ~54k users of 74 events; a ~25 MB Parquet part at top-100


def batch_size_for(n_items: int, top_n: int, budget_mb: int, hidden: int = 600, max_batch: int = 4096) -> int:
    """Users per scoring batch so that one batch's workspace fits `budget_mb`.

    Per user: the float32 score row (4·I), the worst case of top-k's tie fixing (an int32 [I] row,
    metrics._fix_cut_ties), topk's values + indices (12·(k+1)) and the decoder's hidden rows (8·hidden).
    """
    k = min(top_n, n_items)
    per_user = 4 * n_items + 4 * n_items + 12 * (k + 1) + 8 * hidden
    fit = (budget_mb * 2**20) // per_user
    if fit < 1:
        raise DataError(f"a memory budget of {budget_mb} MB cannot hold one user's {n_items} scores",
                        f"raise --memory-budget-mb to at least {per_user // 2**20 + 1}")
    return int(min(fit, max_batch))


def default_parallel_shards() -> int:
    """Shards the local engine keeps in flight by default: one per 4 CPU cores, at least 1, at most 8."""
    return max(1, min(8, (os.cpu_count() or 1) // 4))


def shard_events_for(budget_mb: int) -> int:
    """Default events per shard: what the budget holds (a spilled event costs ~12 bytes on disk, ~60 bytes in
    memory while its shard is turned into a CSR), at most SHARD_EVENTS_MAX whatever the budget. Scoring cannot
    hide the first shard's histories or the last shard's publishing, and on a GPU those decide the end-to-end
    time: at 1M users on 2 cores, one 74M-event shard kept the main thread 19.3 s outside scoring, 9 shards
    3.8 s, 19 shards (this cap) 2.7 s; smaller sorts also cut host busy time (histories 10.3 -> 6.4 s)."""
    return min(SHARD_EVENTS_MAX, max(200_000, budget_mb * 2**20 // 64))
