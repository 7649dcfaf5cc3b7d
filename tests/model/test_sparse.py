"""model.sparse: DeviceCSR row gathering and SparseBatch transforms against dense/scipy references."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch.nn import functional as F

from model.layers import item_output, linear
from model.sparse import SPARSE_MM_IMPLS, DeviceCSR, SparseBatch, as_batch, sparse_matmul, sparse_mm_impl


def random_csr(n_rows: int, n_cols: int, density: float, seed: int, empty_rows: tuple[int, ...] = ()) -> sp.csr_matrix:
    """Non-binary float32 CSR with some forced empty rows."""
    rng = np.random.default_rng(seed)
    dense = np.where(rng.random((n_rows, n_cols)) < density, rng.uniform(0.5, 3.0, (n_rows, n_cols)), 0.0)
    dense[list(empty_rows)] = 0.0
    return sp.csr_matrix(dense.astype(np.float32))


def unsorted_copy(m: sp.csr_matrix, seed: int) -> sp.csr_matrix:
    """The same matrix with the column indices of every row stored in a random order."""
    rng = np.random.default_rng(seed)
    indices, data = m.indices.copy(), m.data.copy()
    for r in range(m.shape[0]):
        s, e = m.indptr[r], m.indptr[r + 1]
        p = rng.permutation(e - s) + s
        indices[s:e], data[s:e] = m.indices[p], m.data[p]
    out = sp.csr_matrix((data, indices, m.indptr.copy()), shape=m.shape)
    out.has_sorted_indices = False
    return out


def check_structure(b: SparseBatch, lengths: np.ndarray) -> None:
    assert b.rows.dtype == torch.int64 and b.cols.dtype == torch.int64 and b.offsets.dtype == torch.int64
    assert b.vals.dtype == torch.float32
    assert b.n_rows == len(lengths)
    np.testing.assert_array_equal(b.offsets.numpy(), np.cumsum(lengths) - lengths)
    np.testing.assert_array_equal(b.rows.numpy(), np.repeat(np.arange(len(lengths)), lengths))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_equals_scipy_rows(seed: int) -> None:
    m = random_csr(50, 30, 0.2, seed, empty_rows=(0, 7, 49))
    x = DeviceCSR.from_scipy(unsorted_copy(m, seed))
    assert x.shape == (50, 30) and x.nnz == m.nnz
    rng = np.random.default_rng(seed)
    # arbitrary order, repeats, empty rows, first and last row
    ids = np.concatenate([rng.integers(0, 50, 40), [7, 7, 0, 49, 3, 3, 3, 12]])
    b = x.batch(torch.as_tensor(ids))
    assert b.n_cols == 30
    np.testing.assert_array_equal(b.to_dense().numpy(), m[ids].toarray())
    np.testing.assert_array_equal(x.dense_rows(torch.as_tensor(ids)).numpy(), m[ids].toarray())
    lengths = np.diff(m.indptr)[ids]
    check_structure(b, lengths)
    for r, u in enumerate(ids):  # per row: the row's columns, sorted, and its values
        s = int(b.offsets[r])
        cols = b.cols[s : s + lengths[r]].numpy()
        np.testing.assert_array_equal(cols, m.indices[m.indptr[u] : m.indptr[u + 1]])
        np.testing.assert_array_equal(b.vals[s : s + lengths[r]].numpy(), m.data[m.indptr[u] : m.indptr[u + 1]])
    np.testing.assert_allclose(b.row_sum().numpy(), np.asarray(m[ids].sum(axis=1)).ravel(), rtol=1e-6)


def test_batch_of_no_rows_and_of_only_empty_rows() -> None:
    m = random_csr(6, 5, 0.5, 0, empty_rows=(1, 4))
    x = DeviceCSR.from_scipy(m)
    none = x.batch(torch.zeros(0, dtype=torch.int64))
    assert none.n_rows == 0 and none.to_dense().shape == (0, 5) and none.vals.numel() == 0
    empty = x.batch(torch.tensor([4, 1, 4]))
    assert empty.vals.numel() == 0
    np.testing.assert_array_equal(empty.to_dense().numpy(), np.zeros((3, 5), np.float32))
    np.testing.assert_array_equal(empty.offsets.numpy(), [0, 0, 0])


def test_from_scipy_keeps_int_and_float64_input_values() -> None:
    m = sp.csr_matrix(np.array([[0, 2, 0], [5, 0, 1]], dtype=np.int64))
    x = DeviceCSR.from_scipy(m)
    assert x.values.dtype == torch.float32
    np.testing.assert_array_equal(x.batch(torch.tensor([1, 0])).to_dense().numpy(), [[5, 0, 1], [0, 2, 0]])


def test_from_scipy_sums_duplicate_entries() -> None:
    # A non-canonical CSR (duplicates), as sp.csr_matrix((data, (rows, cols))) before sum_duplicates or
    # as a caller may build it: scipy's semantics are that duplicates add up.
    m = sp.csr_matrix((np.array([1.0, 2.0, 4.0], np.float32), np.array([3, 3, 0]), np.array([0, 2, 3])), shape=(2, 5))
    assert not m.has_canonical_format
    dense = m.toarray()  # [[0, 0, 0, 3, 0], [4, 0, 0, 0, 0]]
    b = DeviceCSR.from_scipy(m).batch(torch.tensor([0, 1]))
    np.testing.assert_array_equal(b.to_dense().numpy(), dense)
    ref = dense / np.linalg.norm(dense, axis=1, keepdims=True)
    np.testing.assert_allclose(b.l2_normalized().to_dense().numpy(), ref, rtol=1e-6)
    # the embedding-bag/COO consumers see the summed entry once
    assert b.cols.tolist() == [3, 0]


def test_from_scipy_leaves_the_callers_matrix_alone() -> None:
    m = sp.csr_matrix(
        (np.array([1.0, 2.0, 4.0, 5.0], np.float32), np.array([3, 3, 2, 0]), np.array([0, 2, 4])),
        shape=(2, 5),
    )
    before = (m.indptr.copy(), m.indices.copy(), m.data.copy())
    DeviceCSR.from_scipy(m)
    for a, b in zip(before, (m.indptr, m.indices, m.data), strict=True):
        np.testing.assert_array_equal(a, b)


def test_l2_normalized_matches_dense() -> None:
    m = random_csr(40, 25, 0.3, 3, empty_rows=(5, 6))
    b = DeviceCSR.from_scipy(m).batch(torch.arange(40))
    dense = m.toarray()
    ref = dense / np.maximum(np.linalg.norm(dense, axis=1, keepdims=True), 1e-12)
    np.testing.assert_allclose(b.l2_normalized().to_dense().numpy(), ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        b.l2_normalized().to_dense().numpy(),
        F.normalize(torch.from_numpy(dense), dim=1).numpy(),
        rtol=1e-6,
        atol=1e-7,
    )
    # the structure is unchanged, only the values
    nb = b.l2_normalized()
    assert torch.equal(nb.rows, b.rows) and torch.equal(nb.cols, b.cols) and torch.equal(nb.offsets, b.offsets)


def test_binary_sets_stored_values_to_one() -> None:
    m = random_csr(10, 8, 0.4, 4)
    b = DeviceCSR.from_scipy(m).batch(torch.arange(10)).binary()
    np.testing.assert_array_equal(b.to_dense().numpy(), (m.toarray() != 0).astype(np.float32))


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_dropped_out_matches_inverted_dropout(p: float) -> None:
    m = random_csr(200, 100, 0.5, 5, empty_rows=(0,))
    b = DeviceCSR.from_scipy(m).batch(torch.arange(200))
    d = b.dropped_out(p, generator=torch.Generator().manual_seed(1))
    dense, out = m.toarray(), d.to_dense().numpy()
    assert np.all(out[dense == 0] == 0)  # zeros stay zero
    kept = d.vals != 0
    torch.testing.assert_close(d.vals[kept], b.vals[kept] / (1 - p), rtol=1e-6, atol=0)
    frac = float(kept.float().mean())  # nnz ≈ 10k: std of the fraction ≈ 0.005
    assert abs(frac - (1 - p)) < 0.03, frac
    assert torch.equal(d.rows, b.rows) and torch.equal(d.cols, b.cols)
    # inverted dropout keeps the expectation: the total mass is about the same
    assert abs(float(d.vals.sum()) / float(b.vals.sum()) - 1.0) < 0.05
    # same generator seed, same mask; other seed, other mask
    again = b.dropped_out(p, generator=torch.Generator().manual_seed(1))
    other = b.dropped_out(p, generator=torch.Generator().manual_seed(2))
    assert torch.equal(again.vals, d.vals) and not torch.equal(other.vals, d.vals)


def test_dropped_out_zero_is_identity() -> None:
    b = DeviceCSR.from_scipy(random_csr(10, 8, 0.4, 6)).batch(torch.arange(10))
    assert torch.equal(b.dropped_out(0.0).vals, b.vals)


def test_as_batch_round_trips_a_dense_tensor() -> None:
    m = random_csr(30, 20, 0.25, 7, empty_rows=(0, 13, 29))
    dense = torch.from_numpy(m.toarray())
    b = as_batch(dense)
    assert torch.equal(b.to_dense(), dense)
    assert (b.n_rows, b.n_cols) == (30, 20)
    check_structure(b, np.diff(m.indptr))
    # the same triples as gathering the rows from a DeviceCSR
    ref = DeviceCSR.from_scipy(m).batch(torch.arange(30))
    assert torch.equal(b.cols, ref.cols) and torch.equal(b.vals, ref.vals) and torch.equal(b.offsets, ref.offsets)
    assert as_batch(ref) is ref
    # float64 input comes back as float32 values
    assert as_batch(dense.double()).vals.dtype == torch.float32


def test_batch_with_known_total_equals_batch_without() -> None:
    m = random_csr(40, 25, 0.3, 5, empty_rows=(2,))
    x = DeviceCSR.from_scipy(m)
    ids = torch.as_tensor([2, 9, 0, 39, 9])
    total = int(np.diff(m.indptr)[ids.numpy()].sum())
    a, b = x.batch(ids), x.batch(ids, total=total)
    for f in ("rows", "cols", "vals", "offsets"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f


@pytest.mark.parametrize("impl", SPARSE_MM_IMPLS)
def test_sparse_matmul_impls_match_dense_values_and_gradients(impl: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_SPARSE_MM", impl)
    m = random_csr(30, 20, 0.25, 11, empty_rows=(0, 29))
    b = DeviceCSR.from_scipy(m).batch(torch.arange(30))
    w = torch.randn(20, 7, dtype=torch.float64).float().requires_grad_()
    w_ref = w.detach().clone().requires_grad_()
    weights = torch.rand(b.vals.shape)
    out = sparse_matmul(b, w, weights)
    ref = b.with_vals(weights).to_dense() @ w_ref
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-5, atol=1e-6)


def test_unknown_sparse_impl_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_SPARSE_MM", "cusparse")
    b = DeviceCSR.from_scipy(random_csr(3, 4, 0.5, 0)).batch(torch.arange(3))
    with pytest.raises(ValueError, match="RECSYS_SPARSE_MM='cusparse': use one of coo, bag, dense"):
        sparse_matmul(b, torch.ones(4, 2))


def test_cpu_picks_coo_for_training_and_embedding_bag_for_scoring(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RECSYS_SPARSE_MM", raising=False)
    cpu = torch.device("cpu")
    assert sparse_mm_impl(cpu, 100) == "coo"
    with torch.no_grad():
        assert sparse_mm_impl(cpu, 100) == "bag"
        b = DeviceCSR.from_scipy(random_csr(12, 9, 0.3, 4, empty_rows=(5,))).batch(torch.arange(12))
        w = torch.randn(9, 6)
        torch.testing.assert_close(sparse_matmul(b, w), b.to_dense() @ w, rtol=1e-5, atol=1e-6)
    monkeypatch.setenv("RECSYS_SPARSE_MM", "coo")
    with torch.no_grad():
        assert sparse_mm_impl(cpu, 100) == "coo"  # the override still wins


def test_item_output_is_the_linear_layer_with_and_without_autograd() -> None:
    torch.manual_seed(0)
    layer, h = linear(7, 33), torch.randn(5, 7)
    ref = layer(h)
    with torch.no_grad():
        fast = item_output(layer, h)
        buf = torch.full((5, 33), float("nan"))
        into = item_output(layer, h, buf)
    torch.testing.assert_close(fast, ref.detach(), rtol=1e-6, atol=1e-6)
    assert into.data_ptr() == buf.data_ptr()  # scoring writes into the caller's buffer
    torch.testing.assert_close(into, ref.detach(), rtol=1e-6, atol=1e-6)
    other = torch.zeros(5, 33)
    grad_path = item_output(layer, h, other)
    assert grad_path.requires_grad and not other.any()  # training keeps autograd and leaves the buffer alone
    torch.testing.assert_close(grad_path, ref)
