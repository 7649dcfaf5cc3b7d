"""EDLAE (Steck 2020) in model.ease / model.recommenders: the dropout-emphasis penalty, full rank or with EASE's
zero-diagonal constraint, against direct numpy solves on small matrices."""

from __future__ import annotations

from typing import Any

import numpy as np
import pydantic
import pytest
import scipy.sparse as sp
import torch

from model.ease import EASEConfig, EDLAEConfig, ease_weights
from model.recommenders import CLOSED_FORM, EASE, EDLAE, epoch_budget, make_recommender


def tiny(seed: int = 0, users: int = 60, items: int = 15) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    return sp.csr_matrix((rng.random((users, items)) < 0.3).astype(np.float32))


def direct(x: sp.csr_matrix, l2: float, p: float, zero_diagonal: bool) -> np.ndarray:
    """The closed forms solved with numpy in float64: argmin ||X - XB||^2 + ||Lambda^1/2 B||^2 (s.t. diag B = 0)."""
    xd = x.toarray().astype(np.float64)
    g = xd.T @ xd
    lam = np.diag(l2 + p / (1 - p) * np.diag(g))
    if not zero_diagonal:
        return np.linalg.solve(g + lam, g)  # (G + Lambda)^-1 G = I - (G + Lambda)^-1 Lambda
    pinv = np.linalg.inv(g + lam)
    b = np.eye(len(g)) - pinv / np.diag(pinv)[None, :]
    np.fill_diagonal(b, 0.0)
    return b


def test_dropout_0_with_the_constraint_is_ease() -> None:
    x = tiny()
    ease = ease_weights(x, EASEConfig(l2=7.0, dtype="float64"))
    edlae = ease_weights(x, EDLAEConfig(l2=7.0, dropout=0.0, zero_diagonal=True, dtype="float64"))
    torch.testing.assert_close(edlae, ease, rtol=0, atol=0)
    # and the recommenders agree on every score
    a = make_recommender("ease", ease=EASEConfig(l2=7.0)).fit(x)
    b = make_recommender("edlae", ease=EDLAEConfig(l2=7.0, dropout=0.0, zero_diagonal=True)).fit(x)
    h = tiny(seed=1, users=10)
    assert np.array_equal(a.recommend(h, 5)[1], b.recommend(h, 5)[1])


@pytest.mark.parametrize("zero_diagonal", [False, True])
@pytest.mark.parametrize("dtype,rtol,atol", [("float64", 1e-9, 1e-12), ("float32", 2e-3, 2e-5)])
def test_weights_equal_a_direct_solve(zero_diagonal: bool, dtype: str, rtol: float, atol: float) -> None:
    x = tiny()
    cfg = EDLAEConfig(l2=3.0, dropout=0.4, zero_diagonal=zero_diagonal, dtype=dtype)  # type: ignore[arg-type]
    b = ease_weights(x, cfg)
    assert b.dtype == getattr(torch, dtype)
    np.testing.assert_allclose(b.numpy(), direct(x, 3.0, 0.4, zero_diagonal), rtol=rtol, atol=atol)
    if zero_diagonal:
        assert np.all(np.diag(b.numpy()) == 0.0)
    else:  # the full-rank form keeps a diagonal, held below 1 by the dropout (not a constraint)
        d = np.diag(b.numpy())
        assert np.all((d > 0) & (d < 1))


def test_the_dropout_emphasis_changes_the_model() -> None:
    """p > 0 penalizes popular items' columns harder: other weights than EASE's, other rankings."""
    x = tiny()
    ease = ease_weights(x, EASEConfig(l2=3.0, dtype="float64"))
    edlae = ease_weights(x, EDLAEConfig(l2=3.0, dropout=0.5, zero_diagonal=True, dtype="float64"))
    assert not torch.allclose(ease, edlae, atol=1e-3)


def test_recommender_scores_are_history_times_weights() -> None:
    x = tiny()
    rec = EDLAE(EDLAEConfig(l2=3.0, dropout=0.25, dtype="float64"), device="cpu").fit(x)
    assert rec.name == "edlae" and isinstance(rec, EASE)
    h = tiny(seed=2, users=8)
    items, scores = rec.recommend(h, 4, filter_seen=False)
    full = h.toarray() @ direct(x, 3.0, 0.25, False)
    np.testing.assert_allclose(scores, np.take_along_axis(full, items, 1), rtol=1e-5, atol=1e-6)


def test_registry_and_config_routes() -> None:
    assert "edlae" in CLOSED_FORM and epoch_budget("edlae", 200) is None
    rec = make_recommender("edlae")
    assert isinstance(rec, EDLAE) and rec.config == EDLAEConfig()
    # a plain EASEConfig (what code tuning EASE's l2 passes) gives EDLAE's defaults with its l2 and dtype
    from_ease = make_recommender("edlae", ease=EASEConfig(l2=123.0, dtype="float64"))
    assert from_ease.config == EDLAEConfig(l2=123.0, dtype="float64")  # type: ignore[attr-defined]
    assert from_ease.config.model_copy(update={"l2": 5.0}).dropout == EDLAEConfig().dropout  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="configures 'edlae'"):
        make_recommender("ease", ease=EDLAEConfig())


@pytest.mark.parametrize("bad", [{"dropout": 1.0}, {"dropout": -0.1}, {"dropout": 1.5}, {"l2": 0.0}, {"l2": -1.0},
                                 {"zero_diagonal": "maybe"}, {"dtype": "float16"}, {"p": 0.2}])
def test_bad_config_is_rejected(bad: dict[str, Any]) -> None:
    with pytest.raises(pydantic.ValidationError):
        EDLAEConfig(**bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("zero_diagonal", [False, True])
def test_cuda_edlae_matches_the_cpu_path(zero_diagonal: bool) -> None:
    rng = np.random.default_rng(3)
    x = sp.csr_matrix((rng.random((9000, 300)) < 0.05).astype(np.float32))  # > one 4096-user GPU block
    cfg = EDLAEConfig(l2=50.0, dropout=0.3, zero_diagonal=zero_diagonal, dtype="float64")
    gpu = ease_weights(x, cfg, "cuda")
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), ease_weights(x, cfg, "cpu"), rtol=1e-9, atol=1e-12)
