"""Row-wise top-k on the CPU (a numba kernel) for float32 and bf16 [B, I] scores, best first, in a fixed order.

torch.topk on the CPU took 106 ms of a bf16 scoring batch whose output product took 247 ms ([3217, 20108], top
120; docs/benchmarks.md), and among tied values it picks in an order that depends on threads and batch shape.
This kernel reads each row once to take the maximum of each group of 16 columns (a vectorised pass), takes the
k-th largest group maximum as a threshold that at least k columns reach, and sorts only the columns of the
groups that reach it: 43 ms for the same batch. Its order is fixed on any thread count and equals
model.metrics.topk_items' contract: best first, ties to the lower column, NaN ranks as -inf, -0.0 equals 0.0.

Scores are compared as order-preserving integers made from their bits (sign-magnitude → two's complement), so
bf16 rows are read as int16 without a cast to float32. Rows are split over numba's threads, as many as torch's.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
import torch
from numba import njit, prange

_G = 16  # columns per group: one AVX-512 vector of bf16 (two of fp32)


@njit(inline="always")
def _fast(b: Any, shift: int, mask: int) -> np.int32:
    """Branch-free order-preserving key (sign-magnitude → two's complement); -0.0 → -1, NaN beyond ±inf."""
    v = np.int32(b)
    return v ^ ((v >> shift) & mask)


@njit(inline="always")
def _exact(b: Any, mask: int, inf: int) -> np.int32:
    """The ranking key: NaN as -inf, -0.0 as 0.0."""
    v = np.int32(b)
    mag = v & mask
    if mag > inf:
        return np.int32(-inf)
    if v < 0:
        return np.int32(-mag)
    return v


@njit(inline="always")
def _sift_down_values(vals: np.ndarray, i: int, n: int) -> None:
    while True:
        least = i
        left = 2 * i + 1
        right = left + 1
        if left < n and vals[left] < vals[least]:
            least = left
        if right < n and vals[right] < vals[least]:
            least = right
        if least == i:
            return
        vals[i], vals[least] = vals[least], vals[i]
        i = least


@njit(inline="always")
def _select_row(row: np.ndarray, k: int, shift: int, mask: int, inf: int, out_row: np.ndarray, gmax: np.ndarray,
                gheap: np.ndarray, comp: np.ndarray) -> None:
    """The k best columns of one row, best first, ties to the lower column.

    1. The largest fast key of each group of _G columns (a vectorised pass). 2. t = the k-th largest group
    maximum: at least k groups, hence at least k columns, score ≥ t, so every column of the top k scores ≥ t.
    3. Only the groups whose maximum reaches t - 1 are read again (the fast key is below the exact one by at most
    1, at -0.0); their columns with an exact key ≥ t are sorted. A positive NaN would inflate a group maximum and
    a threshold at -inf keeps every group: such rows, and rows with fewer than k groups, sort every column."""
    m = row.shape[0]
    n_groups = (m + _G - 1) // _G
    full = m // _G
    for g in range(full):  # a constant trip count: this loop vectorises
        lo = g * _G
        mx = _fast(row[lo], shift, mask)
        for j in range(lo + 1, lo + _G):
            mx = max(mx, _fast(row[j], shift, mask))
        gmax[g] = mx
    if full < n_groups:
        mx = _fast(row[full * _G], shift, mask)
        for j in range(full * _G + 1, m):
            mx = max(mx, _fast(row[j], shift, mask))
        gmax[full] = mx
    plain = k >= n_groups
    t = np.int32(0)
    if not plain:
        for g in range(k):
            gheap[g] = gmax[g]
        for i in range(k // 2 - 1, -1, -1):
            _sift_down_values(gheap, i, k)
        top = gmax[0]
        for g in range(n_groups):
            if gmax[g] > top:
                top = gmax[g]
            if g >= k and gmax[g] > gheap[0]:
                gheap[0] = gmax[g]
                _sift_down_values(gheap, 0, k)
        t = gheap[0]
        plain = top > inf or t <= -inf + 1
    # the candidates as (−key, column) in one int64 each (keys fit in 32 bits, columns below m): sorting them
    # orders best first, ties to the lower column
    cnt = 0
    if plain:
        for j in range(m):
            comp[cnt] = (np.int64(2**31) - np.int64(_exact(row[j], mask, inf))) * m + j
            cnt += 1
    else:
        for g in range(n_groups):
            if gmax[g] >= t - 1:
                for j in range(g * _G, min(g * _G + _G, m)):
                    e = _exact(row[j], mask, inf)
                    if e >= t:
                        comp[cnt] = (np.int64(2**31) - np.int64(e)) * m + j
                        cnt += 1
    cand = comp[:cnt]
    if cnt > 4 * k:
        cand = np.partition(cand, k - 1)[:k]
    cand.sort()
    for j in range(k):
        out_row[j] = cand[j] % m


@njit(parallel=True, cache=True)
def _topk_bf16(bits: np.ndarray, k: int, threads: int) -> np.ndarray:  # pragma: no cover - compiled
    n, m = bits.shape
    out = np.empty((n, k), np.int64)
    n_chunks = min(n, 8 * threads)
    for c in prange(n_chunks):  # scratch once per chunk of rows, not per row
        gmax = np.empty((m + _G - 1) // _G, np.int32)
        gheap = np.empty(k, np.int32)
        comp = np.empty(m, np.int64)
        for r in range(c * n // n_chunks, (c + 1) * n // n_chunks):
            _select_row(bits[r], k, 15, 0x7FFF, 0x7F80, out[r], gmax, gheap, comp)  # literals: the shifts vectorise
    return out


@njit(parallel=True, cache=True)
def _topk_f32(bits: np.ndarray, k: int, threads: int) -> np.ndarray:  # pragma: no cover - compiled
    n, m = bits.shape
    out = np.empty((n, k), np.int64)
    n_chunks = min(n, 8 * threads)
    for c in prange(n_chunks):
        gmax = np.empty((m + _G - 1) // _G, np.int32)
        gheap = np.empty(k, np.int32)
        comp = np.empty(m, np.int64)
        for r in range(c * n // n_chunks, (c + 1) * n // n_chunks):
            _select_row(bits[r], k, 31, 0x7FFFFFFF, 0x7F800000, out[r], gmax, gheap, comp)
    return out


def supports(scores: torch.Tensor) -> bool:
    """Whether `topk_rows` takes these scores: a CPU [B, I] float32 or bf16 tensor."""
    return scores.device.type == "cpu" and scores.dim() == 2 and scores.dtype in (torch.float32, torch.bfloat16)


def topk_rows(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[B, I] float32/bf16 CPU scores → [B, min(k, I)] int64 columns, best first, ties to the lower column."""
    if not supports(scores):
        raise ValueError(f"topk_rows takes a 2-d float32 or bf16 CPU tensor, got {scores.dtype} {tuple(scores.shape)} "
                         f"on {scores.device}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    b, n_items = scores.shape
    k = min(k, n_items)
    if k == 0 or b == 0:
        return torch.empty(b, k, dtype=torch.int64)
    s = scores.contiguous()
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))  # type: ignore[attr-defined]
    numba.set_num_threads(threads)
    if s.dtype == torch.bfloat16:
        return torch.from_numpy(_topk_bf16(s.view(torch.int16).numpy(), k, threads))
    return torch.from_numpy(_topk_f32(s.view(torch.int32).numpy(), k, threads))


def warm() -> None:
    """Compile both kernels now (numba caches them on disk beside this file, or in the user's cache directory
    where that is read-only): `make test` and the images run this once, so jobs and workers never compile."""
    for dtype in (torch.float32, torch.bfloat16):
        topk_rows(torch.zeros(2, 40, dtype=dtype), 3)


if __name__ == "__main__":
    warm()
