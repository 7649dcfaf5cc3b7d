"""model.ease: EASE weights against the direct numpy formula, the in-place SPD inverse, the Gram matrix."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from model.ease import EASEConfig, _spd_inverse_inplace, ease_weights, gram_cuda, gram_dense
from model.recommenders import EASE


def direct_ease(x: sp.csr_matrix, l2: float) -> np.ndarray:
    """B = I - P diag(1/diag P), P = (X^T X + l2 I)^-1, in float64 (Steck 2019)."""
    xd = x.toarray().astype(np.float64)
    p = np.linalg.inv(xd.T @ xd + l2 * np.eye(xd.shape[1]))
    b = np.eye(xd.shape[1]) - p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    return b


def random_spd(n: int, seed: int, dtype: type = np.float64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = rng.standard_normal((n, n))
    return np.ascontiguousarray((m @ m.T / n + 0.5 * np.eye(n)).astype(dtype))


@pytest.mark.parametrize("dtype,rtol,atol", [("float64", 1e-9, 1e-12), ("float32", 2e-3, 2e-5)])
def test_ease_weights_equal_direct_formula(matrix: sp.csr_matrix, dtype: str, rtol: float, atol: float) -> None:
    x = matrix[:80]
    ref = direct_ease(x, 5.0)
    b = ease_weights(x, EASEConfig(l2=5.0, dtype=dtype))  # type: ignore[arg-type]
    assert b.dtype == getattr(torch, dtype) and b.shape == (x.shape[1], x.shape[1])
    np.testing.assert_allclose(b.numpy(), ref, rtol=rtol, atol=atol)
    assert np.all(np.diag(b.numpy()) == 0.0)


def test_ease_weights_weighted_input() -> None:
    rng = np.random.default_rng(3)
    # multiples of 0.5: every product and sum is exact in float32, whatever precision X^T X is built in
    values = rng.integers(1, 9, (70, 25)) * 0.5
    x = sp.csr_matrix(np.where(rng.random((70, 25)) < 0.2, values, 0.0).astype(np.float32))
    np.testing.assert_allclose(
        ease_weights(x, EASEConfig(l2=2.0, dtype="float64")).numpy(),
        direct_ease(x, 2.0),
        rtol=1e-9,
        atol=1e-12,
    )


def test_float64_gram_is_accumulated_in_float64() -> None:
    rng = np.random.default_rng(3)
    x = sp.csr_matrix(np.where(rng.random((70, 25)) < 0.2, rng.uniform(1, 5, (70, 25)), 0.0).astype(np.float32))
    xd = x.toarray().astype(np.float64)
    np.testing.assert_allclose(gram_dense(x, np.dtype(np.float64)), xd.T @ xd, rtol=1e-12)


@pytest.mark.parametrize("n", [1, 3, 65, 300])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_spd_inverse_inplace_equals_numpy(n: int, dtype: type) -> None:
    a = random_spd(n, seed=n, dtype=dtype)
    ref = np.linalg.inv(a.astype(np.float64))
    g = a.copy()
    out = _spd_inverse_inplace(g)
    assert out.shape == (n, n) and out.dtype == dtype
    tol = 1e-9 if dtype == np.float64 else 2e-4
    np.testing.assert_allclose(out, ref, rtol=tol, atol=tol * np.abs(ref).max())
    assert np.array_equal(out, out.T)  # both triangles filled
    assert np.shares_memory(out, g)  # in place: no second n x n buffer


def test_spd_inverse_rejects_a_non_positive_definite_matrix() -> None:
    a = np.ascontiguousarray(np.diag([1.0, -2.0, 3.0]))
    with pytest.raises(np.linalg.LinAlgError, match=r"Cholesky failed.*l2"):
        _spd_inverse_inplace(a)
    with pytest.raises(np.linalg.LinAlgError, match="Cholesky failed"):
        _spd_inverse_inplace(np.zeros((4, 4), np.float32))


@pytest.mark.parametrize("row_block", [1, 7, 40, 4096])
def test_gram_dense_equals_sparse_product(matrix: sp.csr_matrix, row_block: int) -> None:
    x = matrix[:90]
    ref = (x.T @ x).toarray()
    g = gram_dense(x, np.dtype(np.float64), row_block=row_block)
    assert g.dtype == np.float64 and g.flags.c_contiguous
    np.testing.assert_array_equal(g, ref)


def test_ease_recommender_scores_are_history_times_weights(matrix: sp.csr_matrix) -> None:
    rec = EASE(EASEConfig(l2=5.0, dtype="float64"), device="cpu").fit(matrix[:100])
    hist = matrix[100:120]
    items, scores = rec.recommend(hist, 5, filter_seen=False)
    full = hist.toarray().astype(np.float64) @ direct_ease(matrix[:100], 5.0)
    np.testing.assert_allclose(scores, np.take_along_axis(full, items, 1).astype(np.float32), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(items, np.argsort(-full, axis=1, kind="stable")[:, :5])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cuda_ease_matches_the_cpu_path(dtype: str) -> None:
    rng = np.random.default_rng(3)
    x = sp.csr_matrix((rng.random((9000, 300)) < 0.05).astype(np.float32))  # > one 4096-user GPU block
    g = gram_cuda(x, getattr(torch, dtype), torch.device("cuda"))
    np.testing.assert_array_equal(g.cpu().numpy(), (x.T @ x).toarray())  # counts: exact
    cpu = ease_weights(x, EASEConfig(l2=50.0, dtype=dtype), "cpu")  # type: ignore[arg-type]
    gpu = ease_weights(x, EASEConfig(l2=50.0, dtype=dtype), "cuda")  # type: ignore[arg-type]
    assert gpu.device.type == "cuda" and gpu.dtype == getattr(torch, dtype)
    tol = {"float64": (1e-9, 1e-12), "float32": (2e-3, 2e-5)}[dtype]
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=tol[0], atol=tol[1])


def test_large_catalog_inverse_path_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    import model.ease as ease_mod

    monkeypatch.setattr(ease_mod, "SCIPY_LAPACK_MAX_N", 10)  # force the torch/MKL path on a small matrix
    g = random_spd(40, 7)
    expected = np.linalg.inv(g)
    out = _spd_inverse_inplace(g.copy())
    np.testing.assert_allclose(out, expected, rtol=1e-8, atol=1e-10)
    bad = -np.eye(40)
    with pytest.raises(np.linalg.LinAlgError, match="raise l2"):
        _spd_inverse_inplace(bad)
