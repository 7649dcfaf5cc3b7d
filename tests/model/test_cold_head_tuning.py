"""Tuning the cold head on pseudo-cold titles (model.cold_head_tuning): every (δ, k) of the grids is scored and
the best wins; the held-out titles' own clicks never reach the fit (random metadata ranks them no better than
chance, informative metadata well); too little to hold out is refused with the fix; bad grids fail the config."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from pydantic import ValidationError

from model.cold_head import ColdHeadConfig, ColdHeadTuning
from model.cold_head_tuning import tune_cold_head

N_USERS, N_ITEMS, N_GENRES = 300, 600, 6


def clicks_by_genre(seed: int) -> sp.csr_matrix:
    """Each user clicks titles of one genre (item % N_GENRES) and, rarely, any other."""
    rng = np.random.default_rng(seed)
    liked = rng.integers(N_GENRES, size=N_USERS)
    genre = np.arange(N_ITEMS) % N_GENRES
    p = np.where(genre[None, :] == liked[:, None], 0.1, 0.005)
    return sp.csr_matrix((rng.random((N_USERS, N_ITEMS)) < p).astype(np.float32))


def tags(informative: bool, seed: int = 0) -> dict[str, list[list[str]]]:
    genre = np.arange(N_ITEMS) % N_GENRES
    if not informative:
        genre = np.random.default_rng(seed).permutation(genre)
    return {"tags": [[f"g{g}", f"era{i % 3}"] for i, g in enumerate(genre)]}


GRID = ColdHeadTuning(delta_grid=(1.0, 100.0), neighbours_grid=(0, 10), holdout=0.2)


def test_every_pair_is_scored_and_the_best_wins() -> None:
    t = tune_cold_head(clicks_by_genre(0), tags(True), ColdHeadConfig(), GRID)
    assert [(r["delta"], r["neighbours"]) for r in t.rows] == [(1.0, 0), (1.0, 10), (100.0, 0), (100.0, 10)]
    best = max(t.rows, key=lambda r: r["ndcg"])
    assert (t.delta, t.neighbours, t.ndcg) == (best["delta"], best["neighbours"], best["ndcg"])
    assert t.held_out == round(0.2 * N_ITEMS) and 0 < t.users <= N_USERS
    assert "held out" in t.summary()


def test_held_out_clicks_never_reach_the_fit() -> None:
    """With metadata unrelated to the clicks, held-out titles rank near chance; had their clicks stayed in the
    matrix, each would be its own nearest neighbour and rank first for its clickers."""
    x = clicks_by_genre(1)
    good = tune_cold_head(x, tags(True), ColdHeadConfig(), GRID)
    noise = tune_cold_head(x, tags(False, seed=3), ColdHeadConfig(), GRID)
    assert good.ndcg > 0.33
    assert noise.ndcg < 0.28 and noise.ndcg < good.ndcg - 0.1  # a leak would put each title first: NDCG near 1


def test_the_linear_head_is_tuned_on_marecs_column() -> None:
    x = clicks_by_genre(2)
    eq5 = tune_cold_head(x, tags(True), ColdHeadConfig(), GRID)
    marec = tune_cold_head(x, tags(True), ColdHeadConfig(), GRID, l2=5.0)
    assert marec.held_out == eq5.held_out and marec.users == eq5.users  # the same held-out titles and users
    assert [r["ndcg"] for r in marec.rows] != [r["ndcg"] for r in eq5.rows]  # S − λ1 K S ranks differently
    assert marec.ndcg > 0.33


def test_too_little_to_hold_out_is_refused() -> None:
    x = sp.csr_matrix(np.ones((5, 6), np.float32))
    with pytest.raises(ValueError, match=r"too few to hold out.*cold_head.tune to null"):
        tune_cold_head(x, {"tags": [["a"], ["a"], ["b"], ["b"], ["c"], ["c"]]}, ColdHeadConfig(), ColdHeadTuning())
    lonely = sp.csr_matrix(np.eye(40, dtype=np.float32))  # each user clicked one title: no history left
    with pytest.raises(ValueError, match="no user clicked a held-out title and another"):
        tune_cold_head(lonely, {"tags": [[f"g{i % 4}"] for i in range(40)]}, ColdHeadConfig(), ColdHeadTuning(holdout=0.2))


@pytest.mark.parametrize("bad", [{"delta_grid": ()}, {"delta_grid": (-1.0,)}, {"delta_grid": (float("inf"),)},
                                 {"neighbours_grid": ()}, {"neighbours_grid": (-5,)}, {"holdout": 0.0},
                                 {"holdout": 0.5}, {"max_holdout": 1}, {"unknown": 1}])
def test_a_bad_grid_fails_the_config(bad: dict) -> None:
    with pytest.raises(ValidationError):
        ColdHeadConfig(tune=bad)  # type: ignore[arg-type]
