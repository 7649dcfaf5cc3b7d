"""EASE (Steck, 2019): B = I - P diag(1/diag(P)), P = (X^T X + lambda I)^-1, diag(B) = 0.

EDLAE (Steck, 2020, "Autoencoders that don't overfit towards the Identity"): the closed form of a linear
autoencoder trained with dropout p on its input ("emphasized denoising"): the dropout becomes a diagonal penalty
Lambda = lambda I + p/(1-p) diag(X^T X), P = (X^T X + Lambda)^-1. Full rank (the paper's EDLAE): B = I - P Lambda,
whose diagonal is not forced to 0 (the dropout, not a constraint, keeps B away from the identity); with the
constraint diag(B) = 0 it is EASE's solution under that penalty, B = I - P diag(1/diag(P)). p = 0 with the
constraint is EASE.

Memory: one dense I x I matrix. On the CPU the Gram matrix is inverted in place (LAPACK potrf + potri on
the same buffer), so peak memory is one I x I matrix plus the sparse Gram. On a GPU the Gram matrix is
accumulated there from dense user blocks (exact: float32/float64 accumulation, no TF32), then a Cholesky
factor and its inverse are taken, each freeing its input (two I x I buffers at the peak).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import scipy.sparse as sp
import torch
from pydantic import BaseModel, ConfigDict, Field
from scipy.linalg import lapack

from model.sparse import DeviceCSR


class EASEConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    l2: float = Field(500.0, gt=0.0, description="lambda on the Gram diagonal")
    dtype: Literal["float32", "float64"] = "float32"


class EDLAEConfig(EASEConfig):
    """EASE's settings plus the dropout emphasis (a subclass, so code that sets l2 on an EASEConfig sets it here).

    Defaults: the best validation NDCG@100 on ml-1m-implicit-ge4, seed 0 (l2 100, p 0.5, full rank: 0.4285 against
    EASE's 0.4256; with diag(B) = 0: 0.4281; issue 28, docs/results.md)."""

    l2: float = Field(100.0, gt=0.0, description="lambda on the diagonal, added to the dropout emphasis")
    dropout: float = Field(0.5, ge=0.0, lt=1.0, description="p: input dropout; penalty p/(1-p) x each item's Gram "
                                                               "diagonal (its count, for binary data)")
    zero_diagonal: bool = Field(False, description="True: EASE's constraint diag(B) = 0 under the EDLAE penalty; "
                                                   "False: the full-rank EDLAE, B = I - P Lambda (Steck 2020)")


def gram_dense(x: sp.csr_matrix, dtype: np.dtype, row_block: int = 4096) -> np.ndarray:
    """X^T X as a dense array, filled block by block from the sparse product (no second dense copy)."""
    xd = x.astype(dtype, copy=False)  # accumulate in the target precision
    g_sparse = (xd.T @ xd).tocsr()
    n = x.shape[1]
    g = np.empty((n, n), dtype=dtype)
    for start in range(0, n, row_block):
        g[start : start + row_block] = g_sparse[start : start + row_block].toarray()
    return g


# scipy's bundled 32-bit-integer OpenBLAS (0.3.30) crashed with SIGSEGV in spotrf on a 41k x 41k matrix here
# (33k worked): above this size the inverse goes through torch's LAPACK (MKL), in place through `out=`
# (torch may hold one transient column-major copy).
SCIPY_LAPACK_MAX_N = 32_768


def _spd_inverse_inplace(g: np.ndarray) -> np.ndarray:
    """Inverse of a symmetric positive definite matrix, overwriting g (C-contiguous)."""
    if g.shape[0] > SCIPY_LAPACK_MAX_N:
        t = torch.from_numpy(g)  # shares g's buffer
        try:
            torch.linalg.cholesky(t, out=t)
        except torch.linalg.LinAlgError as err:
            raise np.linalg.LinAlgError(f"Cholesky failed ({err}): raise l2 so that X^T X + l2*I is positive definite") from err
        torch.cholesky_inverse(t, out=t)
        return g
    potrf, potri = (lapack.dpotrf, lapack.dpotri) if g.dtype == np.float64 else (lapack.spotrf, lapack.spotri)
    gf = g.T  # the same buffer seen as Fortran-ordered: LAPACK works on it without a copy
    c, info = potrf(gf, lower=1, overwrite_a=1, clean=0)
    if info != 0:
        raise np.linalg.LinAlgError(f"Cholesky failed (info={info}): raise l2 so that X^T X + l2*I is positive definite")
    inv, info = potri(c, lower=1, overwrite_c=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"potri failed (info={info})")
    # potri filled the lower triangle of gf (= upper of g); mirror it in place, block by block
    out = inv.T
    n = out.shape[0]
    step = 2048
    for s in range(0, n, step):
        e = min(n, s + step)
        out[s:e, :s] = out[:s, s:e].T
        blk = out[s:e, s:e]
        out[s:e, s:e] = np.triu(blk) + np.triu(blk, 1).T
    return out


def gram_cuda(x: sp.csr_matrix, dtype: torch.dtype, device: torch.device, user_block: int = 4096) -> torch.Tensor:
    """X^T X [I, I] accumulated on the GPU from dense blocks of users."""
    csr = DeviceCSR.from_scipy(x, device)
    n = x.shape[1]
    g = torch.zeros(n, n, dtype=dtype, device=device)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # exact float32 sums, whatever the caller set
    try:
        for start in range(0, x.shape[0], user_block):
            rows = torch.arange(start, min(x.shape[0], start + user_block), device=device)
            xb = csr.batch(rows).to_dense().to(dtype)  # [b, I]
            g.addmm_(xb.T, xb)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return g


def ease_weights(x: sp.csr_matrix, config: EASEConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    """The item-item weight matrix B [I, I] on `device` (EASE, or EDLAE for an EDLAEConfig)."""
    if isinstance(config, EDLAEConfig):
        return closed_form_weights(x, config.l2, config.dropout, config.zero_diagonal, config.dtype, device)
    return closed_form_weights(x, config.l2, 0.0, True, config.dtype, device)


def closed_form_weights(x: sp.csr_matrix, l2: float, dropout: float, zero_diagonal: bool,
                        dtype: Literal["float32", "float64"], device: torch.device | str = "cpu") -> torch.Tensor:
    """B [I, I] for the penalty Lambda = l2 + dropout/(1-dropout) x diag(X^T X) (see the module doc)."""
    device = torch.device(device)
    emphasis = dropout / (1.0 - dropout)
    if device.type == "cuda":
        gt = gram_cuda(sp.csr_matrix(x), getattr(torch, dtype), device)
        lam = torch.diagonal(gt) * emphasis + l2  # a new tensor: Lambda's diagonal
        gt.diagonal().add_(lam)
        chol = torch.linalg.cholesky(gt)
        del gt
        p = torch.cholesky_inverse(chol)
        del chol
    else:
        g = gram_dense(sp.csr_matrix(x), np.dtype(dtype))
        diag = np.diag_indices_from(g)
        lam_np = g[diag] * np.asarray(emphasis, g.dtype) + np.asarray(l2, g.dtype)
        g[diag] += lam_np
        p = torch.from_numpy(_spd_inverse_inplace(g))
        lam = torch.from_numpy(lam_np)
    if zero_diagonal:
        d = torch.diagonal(p).clone()
        p.div_(-d[None, :])  # B_ij = -P_ij / P_jj
        p.fill_diagonal_(0.0)
    else:
        p.mul_(-lam[None, :])  # B = I - P Lambda: B_ij = -P_ij Lambda_jj, plus 1 on the diagonal
        p.diagonal().add_(1.0)
    return p
