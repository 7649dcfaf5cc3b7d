"""Synthetic implicit-feedback data for tests and benchmarks (vectorized numpy, seeded).

``synth_interactions`` imitates the structure real data sets have and that the models exploit:

- item popularity follows a power law (Zipf: the item of popularity rank r has weight r^-exponent;
  ranks are a random permutation of the item ids);
- user activity is log-normal (sigma 1, scaled so that the mean is about ``mean_items_per_user``),
  clipped to [5, n_items // 2];
- latent taste clusters: every item belongs to one of ``n_clusters`` clusters, every user to one
  cluster; a user's draws come with probability ``cluster_share`` from their cluster's items (weighted
  by popularity) and otherwise from global popularity. Users of one cluster therefore share items
  beyond the popular ones, which a collaborative model can learn and a popularity baseline cannot.

Each user gets exactly the drawn activity count of distinct items: draws are made with replacement,
repeats are rejected and the users left short draw again (which amounts to drawing one item at a time
without replacement); if a tiny cluster runs dry, uniform random new items fill the rest. ``weight`` is
a heavy-tailed play-count-like value >= 1 (floor of a log-normal, plus 1), independent of the item.
Users are generated in chunks, so memory stays bounded (ML-20M shape: about 120 MB peak).
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import scipy.sparse as sp

MIN_ITEMS_PER_USER = 5
_ACTIVITY_SIGMA = 1.0
_OVERSAMPLE = 1.5
_MAX_ROUNDS = 30
_CHUNK_DRAWS = 1 << 20  # draws per chunk of users: bounds the temporary arrays


def _zipf_weights(n_items: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Popularity weight per item id: rank^-exponent with ranks randomly assigned to ids."""
    ranks = rng.permutation(n_items).astype(np.float64) + 1.0
    return ranks ** (-float(exponent))


def _activity(n_users: int, mean: float, max_items: int, rng: np.random.Generator) -> np.ndarray:
    """Log-normal number of items per user, mean about `mean`, clipped to [5, max_items]."""
    mu = np.log(mean) - _ACTIVITY_SIGMA**2 / 2.0
    raw = rng.lognormal(mu, _ACTIVITY_SIGMA, size=n_users)
    return np.clip(np.rint(raw), MIN_ITEMS_PER_USER, max_items).astype(np.int64)


class _InverseCDF:
    """``searchsorted(cdf, x, side="right")`` for many x, via a guide table (Devroye's indexed search).

    ``cdf`` is non-decreasing with ``cdf[-1] == hi``. Bucket b of the table covers [b, b + 1) * hi / M
    and stores the answer for its left edge; a draw then steps right past the few entries of its bucket.
    Random binary searches into the cdf are cache-bound; this is a gather plus one or two vectorized steps.
    """

    def __init__(self, cdf: np.ndarray, hi: float, buckets_per_entry: int = 8):
        self.cdf = cdf
        self.last = len(cdf) - 1
        self.scale = buckets_per_entry * len(cdf) / hi
        edges = np.arange(buckets_per_entry * len(cdf) + 1) / self.scale
        self.guide = np.minimum(np.searchsorted(cdf, edges, side="right"), self.last)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        bucket = np.minimum((x * self.scale).astype(np.int64), len(self.guide) - 1)
        idx = self.guide[bucket]
        todo = np.flatnonzero(self.cdf[idx] <= x)
        while len(todo):
            idx[todo] += 1
            todo = todo[(idx[todo] < self.last) & (self.cdf[idx[todo]] <= x[todo])]
        return idx


class _Sampler:
    """Draws items for users: mixture of the user's cluster (by popularity) and global popularity."""

    def __init__(self, popularity: np.ndarray, item_cluster: np.ndarray, n_clusters: int, share: float):
        self.share = share
        global_cdf = np.cumsum(popularity)
        global_cdf /= global_cdf[-1]
        global_cdf[-1] = 1.0
        self.global_lookup = _InverseCDF(global_cdf, 1.0)
        # Items grouped by cluster; in cluster c the cumulative popularity runs over (c, c + 1].
        self.by_cluster = np.argsort(item_cluster, kind="stable")
        clusters_sorted = item_cluster[self.by_cluster]
        pop_sorted = popularity[self.by_cluster]
        cum = np.cumsum(pop_sorted)
        starts = np.searchsorted(clusters_sorted, np.arange(n_clusters), side="left")
        ends = np.searchsorted(clusters_sorted, np.arange(n_clusters), side="right")
        before = np.where(starts > 0, cum[np.maximum(starts - 1, 0)], 0.0)
        total = cum[ends - 1] - before
        within = (cum - before[clusters_sorted]) / total[clusters_sorted]
        within[ends - 1] = 1.0  # exact upper edge per cluster, so a draw never spills into the next
        self.cluster_lookup = _InverseCDF(clusters_sorted + within, float(n_clusters))

    def draw(self, user_cluster_of_draw: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        n = len(user_cluster_of_draw)
        u = rng.random(n)
        from_cluster = rng.random(n) < self.share if self.share > 0 else np.zeros(n, dtype=bool)
        items = np.empty(n, dtype=np.int64)
        pos = self.cluster_lookup(user_cluster_of_draw[from_cluster] + u[from_cluster])
        items[from_cluster] = self.by_cluster[pos]
        g = ~from_cluster
        items[g] = self.global_lookup(u[g])
        return items


def _sorted_unique(keys: np.ndarray) -> np.ndarray:
    """Sorted distinct values (sort + mask; np.unique's hash path is much slower on large arrays)."""
    keys = np.sort(keys)
    if len(keys) < 2:
        return keys
    return keys[np.concatenate(([True], keys[1:] != keys[:-1]))]


def _distinct_draws(
    want: np.ndarray, user_cluster: np.ndarray, sampler: _Sampler, n_items: int, rng: np.random.Generator
) -> np.ndarray:
    """Sorted keys user * n_items + item with exactly want[u] distinct items per user.

    Round 1 draws want[u] items per user and removes duplicates; later rounds draw (oversampled) the
    deficit of the users left short, drop items they already have, and keep the first new ones in draw
    order, which amounts to drawing one item at a time and rejecting repeats. Users still short after
    _MAX_ROUNDS (a user who wants most of a small cluster) are filled with uniform random new items.
    """
    n_users = len(want)
    du = np.repeat(np.arange(n_users, dtype=np.int64), want)
    keys = _sorted_unique(du * n_items + sampler.draw(user_cluster[du], rng))
    del du
    short_user = np.bincount(keys // n_items, minlength=n_users) < want
    if not short_user.any():
        return keys
    # Later rounds only touch the (few) users left short; their keys are merged back at the end.
    in_short = short_user[keys // n_items]
    done, keys = keys[~in_short], keys[in_short]
    want_short = np.where(short_user, want, 0)  # users already done are not looked at again
    oversample = _OVERSAMPLE
    for _ in range(_MAX_ROUNDS):
        deficit = want_short - np.bincount(keys // n_items, minlength=n_users)
        short = np.flatnonzero(deficit > 0)
        if len(short) == 0:
            break
        du = np.repeat(short, np.ceil(deficit[short] * oversample).astype(np.int64) + 2)
        dk = du * n_items + sampler.draw(user_cluster[du], rng)
        order = np.argsort(dk, kind="stable")  # equal keys keep draw order: the first one wins
        sk = dk[order]
        keep = np.concatenate(([True], sk[1:] != sk[:-1]))
        pos = np.minimum(np.searchsorted(keys, sk), len(keys) - 1)  # sorted needles: a linear merge
        keep &= keys[pos] != sk  # drop items the user already has
        first = np.sort(order[keep])  # back to draw order; du stays grouped by user (np.repeat order)
        du, dk = du[first], dk[first]
        rank = np.arange(len(du)) - np.searchsorted(du, du, side="left")
        new = np.sort(dk[rank < deficit[du]])
        keys = np.sort(np.concatenate((keys, new)), kind="stable")  # two sorted runs: a linear merge
        oversample = min(2.0 * oversample, 64.0)  # the users still short are the hard ones

    deficit = want_short - np.bincount(keys // n_items, minlength=n_users)
    extra = []
    for user in np.flatnonzero(deficit > 0):
        lo, hi = np.searchsorted(keys, [user * n_items, (user + 1) * n_items])
        owned = keys[lo:hi] - user * n_items
        free = np.setdiff1d(np.arange(n_items, dtype=np.int64), owned, assume_unique=True)
        extra.append(user * n_items + rng.choice(free, size=int(deficit[user]), replace=False))
    return np.sort(np.concatenate([done, keys, *(np.sort(e) for e in extra)]), kind="stable")


def _distinct_items(
    want: np.ndarray,
    user_cluster: np.ndarray,
    sampler: _Sampler,
    n_items: int,
    rng: np.random.Generator,
    dtype: type = np.int64,
) -> np.ndarray:
    """Items of every user, grouped by user (ascending) and sorted within a user; want[u] per user.

    Users are processed in chunks of about _CHUNK_DRAWS draws, so temporary arrays stay small whatever
    the total; the user of each entry is implied by ``want`` (``np.repeat(arange, want)``).
    """
    starts = np.cumsum(want) - want
    chunk_of_user = starts // _CHUNK_DRAWS
    edges = np.concatenate(([0], np.flatnonzero(np.diff(chunk_of_user)) + 1, [len(want)]))
    parts: list[np.ndarray] = []
    for lo, hi in itertools.pairwise(edges):
        keys = _distinct_draws(want[lo:hi], user_cluster[lo:hi], sampler, n_items, rng)
        parts.append((keys % n_items).astype(dtype))
    return np.concatenate(parts)


def synth_interactions_with_clusters(
    n_users: int,
    n_items: int,
    seed: int,
    mean_items_per_user: float = 30,
    n_clusters: int = 10,
    popularity_exponent: float = 1.0,
    cluster_share: float = 0.8,
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """``synth_interactions`` plus the ground truth: (frame, user_cluster[n_users], item_cluster[n_items])."""
    if n_users < 1:
        raise ValueError(f"n_users must be >= 1, got {n_users}")
    if n_items < 2 * MIN_ITEMS_PER_USER:
        raise ValueError(f"n_items must be >= {2 * MIN_ITEMS_PER_USER} (users need >= 5 of n_items // 2)")
    if not 1 <= n_clusters <= n_items:
        raise ValueError(f"n_clusters must be in [1, n_items], got {n_clusters}")
    if mean_items_per_user <= 0:
        raise ValueError(f"mean_items_per_user must be > 0, got {mean_items_per_user}")
    if not 0.0 <= cluster_share <= 1.0:
        raise ValueError(f"cluster_share must be in [0, 1], got {cluster_share}")
    if popularity_exponent < 0:
        raise ValueError(f"popularity_exponent must be >= 0, got {popularity_exponent}")

    rng = np.random.default_rng(seed)
    popularity = _zipf_weights(n_items, popularity_exponent, rng)
    # Round-robin then shuffled: every cluster gets items, sizes differ by at most one.
    item_cluster = rng.permutation(np.arange(n_items) % n_clusters).astype(np.int64)
    user_cluster = rng.integers(0, n_clusters, size=n_users, dtype=np.int64)
    want = _activity(n_users, float(mean_items_per_user), n_items // 2, rng)
    sampler = _Sampler(popularity, item_cluster, n_clusters, float(cluster_share))

    items = _distinct_items(want, user_cluster, sampler, n_items, rng)
    users = np.repeat(np.arange(n_users, dtype=np.int64), want)
    # Play-count-like weights >= 1 (heavy tailed), in case a pipeline wants a weight threshold.
    weight = (np.floor(rng.lognormal(0.0, 1.0, size=len(users))) + 1.0).astype(np.float32)
    frame = pd.DataFrame({"user_id": users, "item_id": items, "weight": weight})
    return frame, user_cluster, item_cluster


def synth_interactions(
    n_users: int,
    n_items: int,
    seed: int,
    mean_items_per_user: float = 30,
    n_clusters: int = 10,
    popularity_exponent: float = 1.0,
    cluster_share: float = 0.8,
) -> pd.DataFrame:
    """Synthetic implicit interactions: columns user_id (int64), item_id (int64), weight (float32).

    Ids are 0..n_users-1 and 0..n_items-1; rows are sorted by (user_id, item_id); every user has between
    5 and n_items // 2 distinct items. Same seed, same frame. See the module doc for the model.
    """
    frame, _, _ = synth_interactions_with_clusters(
        n_users, n_items, seed, mean_items_per_user, n_clusters, popularity_exponent, cluster_share
    )
    return frame


def synth_ml20m_like_csr(
    n_users: int = 116_677,
    n_items: int = 20_108,
    mean_items: float = 74,
    seed: int = 0,
    popularity_exponent: float = 1.0,
) -> sp.csr_matrix:
    """A binary float32 CSR matrix shaped like ML-20M's training users (for benchmarks).

    Log-normal activity around ``mean_items`` (clipped to [5, n_items // 2]); each row holds exactly that
    many distinct items drawn from a Zipf popularity (no clusters). The CSR arrays are built directly
    from one sorted int64 key per interaction: no DataFrame, no COO round trip.
    """
    if n_users < 1 or n_items < 2 * MIN_ITEMS_PER_USER:
        raise ValueError(f"need n_users >= 1 and n_items >= {2 * MIN_ITEMS_PER_USER}")
    rng = np.random.default_rng(seed)
    popularity = _zipf_weights(n_items, popularity_exponent, rng)
    counts = _activity(n_users, float(mean_items), n_items // 2, rng)
    sampler = _Sampler(popularity, np.zeros(n_items, dtype=np.int64), 1, 0.0)
    index_dtype = np.int32 if max(int(counts.sum()), n_items) < 2**31 else np.int64
    indices = _distinct_items(counts, np.zeros(n_users, dtype=np.int64), sampler, n_items, rng, index_dtype)
    indptr = np.zeros(n_users + 1, dtype=index_dtype)
    np.cumsum(counts, out=indptr[1:])
    data = np.ones(len(indices), dtype=np.float32)
    matrix = sp.csr_matrix((data, indices, indptr), shape=(n_users, n_items))
    matrix.has_sorted_indices = True
    return matrix
