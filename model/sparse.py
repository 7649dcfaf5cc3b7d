"""A CSR matrix kept on the training device, and sparse mini-batches gathered from it.

Batches never go through scipy or a dense CPU copy: row slices are gathered on the device as flat
(row, col, value) triples, which the first encoder layer consumes directly (an embedding bag).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from torch.nn import functional as F


@dataclass(frozen=True)
class SparseBatch:
    """Rows of a sparse matrix as flat triples: entry j is (rows[j], cols[j]) = vals[j]."""

    rows: torch.Tensor  # [nnz] int64, batch-local row 0..n_rows-1, non-decreasing
    cols: torch.Tensor  # [nnz] int64 item columns
    vals: torch.Tensor  # [nnz] float32
    offsets: torch.Tensor  # [n_rows] int64 start of each row in the flat arrays
    n_rows: int
    n_cols: int

    def to_dense(self) -> torch.Tensor:
        out = torch.zeros(self.n_rows, self.n_cols, device=self.vals.device, dtype=self.vals.dtype)
        out[self.rows, self.cols] = self.vals
        return out

    def row_sum(self, values: torch.Tensor | None = None) -> torch.Tensor:
        """Per-row sum of `values` (default: this batch's values). [n_rows]"""
        v = self.vals if values is None else values
        return torch.zeros(self.n_rows, device=v.device, dtype=v.dtype).index_add_(0, self.rows, v)

    def with_vals(self, vals: torch.Tensor) -> SparseBatch:
        return SparseBatch(self.rows, self.cols, vals, self.offsets, self.n_rows, self.n_cols)

    def l2_normalized(self) -> SparseBatch:
        norm = self.row_sum(self.vals * self.vals).sqrt().clamp_min(1e-12)
        return self.with_vals(self.vals / norm[self.rows])

    def dropped_out(self, p: float, generator: torch.Generator | None = None) -> SparseBatch:
        """Inverted dropout on the stored entries; zeros of a dense matrix stay zero, as in F.dropout."""
        if p <= 0.0:
            return self
        keep = torch.rand(self.vals.shape, device=self.vals.device, generator=generator) >= p
        return self.with_vals(self.vals * keep / (1.0 - p))

    def binary(self) -> SparseBatch:
        return self.with_vals(torch.ones_like(self.vals))


def canonical_csr(matrix: sp.spmatrix | sp.sparray) -> sp.csr_matrix:
    """float32 CSR with sorted, unique (row, col) entries (duplicates summed): the COO products rely on it, and row
    lengths taken on the host must match the device copy's. The caller's arrays are never rewritten."""
    m = sp.csr_matrix(matrix, dtype=np.float32)
    if not m.has_canonical_format:
        m = m.copy()
        m.sum_duplicates()
    return m


class DeviceCSR:
    """CSR arrays on a device; `batch(row_ids)` gathers rows without leaving the device."""

    def __init__(self, indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]):
        self.indptr = indptr  # [n_rows + 1] int64
        self.indices = indices  # [nnz] int64
        self.values = values  # [nnz] float32
        self.shape = shape

    @classmethod
    def from_scipy(cls, matrix: sp.csr_matrix, device: torch.device | str = "cpu") -> DeviceCSR:
        m = canonical_csr(matrix)
        return cls(
            torch.as_tensor(m.indptr.astype(np.int64), device=device),
            torch.as_tensor(m.indices.astype(np.int64), device=device),
            torch.as_tensor(m.data, device=device),
            (int(m.shape[0]), int(m.shape[1])),
        )

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def n_rows(self) -> int:
        return self.shape[0]

    @property
    def n_cols(self) -> int:
        return self.shape[1]

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    def row_lengths(self) -> torch.Tensor:
        return self.indptr[1:] - self.indptr[:-1]

    def batch(self, row_ids: torch.Tensor, total: int | None = None) -> SparseBatch:
        """Rows `row_ids`; `total` (their nnz, when the caller knows it) spares a host sync on the device."""
        row_ids = row_ids.to(self.device, torch.int64)
        starts = self.indptr[row_ids]
        lengths = self.indptr[row_ids + 1] - starts
        if total is None:
            total = int(lengths.sum())  # a host sync: the output size
        n = int(row_ids.numel())
        offsets = torch.cumsum(lengths, 0) - lengths
        rows = torch.repeat_interleave(torch.arange(n, device=self.device), lengths, output_size=total)
        # position of each entry inside the flat CSR arrays
        pos = torch.arange(total, device=self.device) - offsets[rows] + starts[rows]
        return SparseBatch(rows, self.indices[pos], self.values[pos], offsets, n, self.n_cols)

    def dense_rows(self, row_ids: torch.Tensor) -> torch.Tensor:
        return self.batch(row_ids).to_dense()


def as_batch(x: SparseBatch | torch.Tensor) -> SparseBatch:
    """Accept a dense [B, I] tensor too (inference callers): convert it to triples."""
    if isinstance(x, SparseBatch):
        return x
    rows, cols = torch.nonzero(x, as_tuple=True)
    counts = torch.bincount(rows, minlength=x.shape[0])
    offsets = torch.cumsum(counts, 0) - counts
    return SparseBatch(rows, cols, x[rows, cols].float(), offsets, int(x.shape[0]), int(x.shape[1]))


SPARSE_MM_IMPLS = ("coo", "bag", "dense")


DENSE_MAX_COLS = 200_000  # a dense [500, I] float32 batch stays under 0.4 GB


def sparse_mm_impl(device: torch.device, n_cols: int) -> str:
    """How x @ W is computed for a sparse batch on `device` (env RECSYS_SPARSE_MM overrides, for benchmarks).

    CPU: a COO sparse.mm when training (measured faster than embedding_bag, whose CPU backward sorts the
    indices), embedding_bag when scoring.
    CUDA: densify the batch on the device and use a plain matmul, up to DENSE_MAX_COLS items, else
    embedding_bag (on an H100: dense 1.37, embedding_bag 1.54, COO 1.82 s/epoch; docs/benchmarks.md).
    """
    if device.type == "cuda":
        auto = "dense" if n_cols <= DENSE_MAX_COLS else "bag"
    else:  # without autograd (scoring) embedding_bag's forward is the faster one: 17 vs 56 ms for 3,217 users
        auto = "coo" if torch.is_grad_enabled() else "bag"
    impl = os.environ.get("RECSYS_SPARSE_MM") or auto
    if impl not in SPARSE_MM_IMPLS:
        raise ValueError(f"RECSYS_SPARSE_MM={impl!r}: use one of {', '.join(SPARSE_MM_IMPLS)}")
    return impl


def sparse_matmul(x: SparseBatch, weight: torch.Tensor, vals: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight for a sparse batch x [B, I] and a dense weight [I, H] -> [B, H] (float32 unless dense)."""
    v = x.vals if vals is None else vals
    impl = sparse_mm_impl(weight.device, x.n_cols)
    if impl == "dense":  # densify on the device; the product then follows autocast (bf16 on tensor cores)
        dense = torch.zeros(x.n_rows, x.n_cols, device=v.device, dtype=weight.dtype)
        dense[x.rows, x.cols] = v.to(weight.dtype)
        return dense @ weight
    # sparse kernels have no bf16 CUDA implementation: run them in float32 outside autocast
    with torch.autocast(weight.device.type, enabled=False):
        w = weight.float()
        if impl == "bag":
            return F.embedding_bag(x.cols, w, x.offsets, mode="sum", per_sample_weights=v.float())
        # A COO matrix already in (row, col) order: no coalescing sort forward; torch's sparse mm backward
        # gives weight its gradient x^T @ grad.
        coo = torch.sparse_coo_tensor(torch.stack([x.rows, x.cols]), v.float(), (x.n_rows, w.shape[0]),
                                      is_coalesced=True, check_invariants=False)
        return torch.sparse.mm(coo, w)


def row_mean_weights(x: SparseBatch) -> torch.Tensor:
    """Per-entry weights 1/|row| so that sparse_matmul(x, w, row_mean_weights(x)) averages rows of w."""
    counts = x.row_sum(torch.ones_like(x.vals)).clamp_min(1.0)
    return 1.0 / counts[x.rows]
