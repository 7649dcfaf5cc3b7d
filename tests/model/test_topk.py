"""model.topk: the numba top-k keeps model.metrics.topk_items' contract (best first, ties to the lower column, NaN as
-inf, -0.0 equal to 0.0) on float32 and bf16, on any thread count."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.metrics import FAST_TOPK_MIN_ELEMENTS, topk_items
from model.topk import supports, topk_rows


def _reference(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Independent of both implementations: numpy lexsort on (-value, column), NaN as -inf, -0.0 as 0.0."""
    v = scores.float().numpy().astype(np.float64)
    v = np.where(np.isnan(v), -np.inf, v) + 0.0  # + 0.0 turns -0.0 into 0.0
    cols = np.arange(v.shape[1])
    out = [np.lexsort((cols, -row))[: min(k, v.shape[1])] for row in v]
    return torch.from_numpy(np.asarray(out, dtype=np.int64).reshape(v.shape[0], -1))


def _scores(rng: np.random.Generator, b: int, n: int, dtype: torch.dtype, ties: bool, specials: bool) -> torch.Tensor:
    s = torch.from_numpy(rng.integers(-4, 4, (b, n)).astype(np.float32) / 2) if ties else torch.from_numpy(
        rng.standard_normal((b, n)).astype(np.float32))
    if specials:
        for value, share in ((float("nan"), 0.1), (float("-inf"), 0.2), (-0.0, 0.1), (0.0, 0.1), (float("inf"), 0.02)):
            s[torch.from_numpy(rng.random((b, n)) < share)] = value
    return s.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_the_reference_on_ties_nan_infinities_and_signed_zeros(dtype: torch.dtype) -> None:
    rng = np.random.default_rng(0)
    for trial in range(120):
        b, n = int(rng.integers(1, 12)), int(rng.integers(1, 400))
        k = int(rng.integers(0, n + 3))
        s = _scores(rng, b, n, dtype, ties=trial % 2 == 1, specials=trial % 3 == 0)
        got = topk_rows(s, k)
        assert got.shape == (b, min(k, n))
        assert torch.equal(got, _reference(s, k)), (trial, dtype)
        assert torch.equal(got, topk_items(s, k))  # small: topk_items' own torch path


def test_bf16_logits_with_many_ties_at_the_cut_keep_the_lower_columns() -> None:
    # bf16 keeps 8 bits of mantissa: flat logits tie in long runs, the case torch.topk resolves by thread layout
    s = torch.full((3, 5000), 0.5, dtype=torch.bfloat16)
    s[:, 4000:] = 0.75
    s[1, 10] = float("nan")
    got = topk_rows(s, 1200)
    assert torch.equal(got[0], torch.cat([torch.arange(4000, 5000), torch.arange(0, 200)]))
    assert torch.equal(got[1], torch.cat([torch.arange(4000, 5000), torch.arange(0, 10), torch.arange(11, 201)]))


def test_a_row_with_fewer_than_k_finite_scores_ends_with_its_masked_columns_in_order() -> None:
    s = torch.full((2, 3000), float("-inf"))
    s[0, [5, 2999, 17]] = torch.tensor([1.0, 3.0, 2.0])
    got = topk_rows(s, 6)
    assert got[0].tolist() == [2999, 17, 5, 0, 1, 2]
    assert got[1].tolist() == [0, 1, 2, 3, 4, 5]


def test_the_order_does_not_depend_on_the_thread_count() -> None:
    s = _scores(np.random.default_rng(1), 64, 20_000, torch.bfloat16, ties=False, specials=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = topk_rows(s, 120)
        torch.set_num_threads(2)
        two = topk_rows(s, 120)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
    assert torch.equal(one, _reference(s, 120))


def test_topk_items_takes_the_kernel_on_a_scoring_sized_batch() -> None:
    s = _scores(np.random.default_rng(2), 64, 20_000, torch.float32, ties=True, specials=True)
    assert s.numel() >= FAST_TOPK_MIN_ELEMENTS
    assert torch.equal(topk_items(s, 100), _reference(s, 100))


def test_other_inputs_are_refused_with_what_it_takes() -> None:
    assert not supports(torch.zeros(2, 3, dtype=torch.float64))
    assert not supports(torch.zeros(3))
    with pytest.raises(ValueError, match="float32 or bf16 CPU tensor"):
        topk_rows(torch.zeros(2, 3, dtype=torch.float16), 1)
    with pytest.raises(ValueError, match="k must be >= 0"):
        topk_rows(torch.zeros(2, 3), -1)
    assert topk_rows(torch.zeros(0, 3), 2).shape == (0, 2)
    assert topk_rows(torch.zeros(2, 3), 0).shape == (2, 0)
