"""Tests for model.metrics: hand-worked cases, a plain-Python reference, ties, dtypes, devices."""

from __future__ import annotations

import math
import random

import pytest
import torch

from model import metrics
from model.metrics import (
    coverage_at_k,
    mean_over_valid,
    ndcg_at_k,
    ranking_metrics,
    recall_at_k,
    topk_items,
)

NEG_INF = float("-inf")


def _targets(n_items: int, rows: list[list[int]]) -> torch.Tensor:
    t = torch.zeros(len(rows), n_items, dtype=torch.bool)
    for u, items in enumerate(rows):
        t[u, items] = True
    return t


# ---------------------------------------------------------------- plain-Python reference


def ref_topk(row: list[float], k: int) -> list[int]:
    """Best first, ties to the lower index; NaN ranks as -inf."""
    key = [NEG_INF if math.isnan(v) else v for v in row]
    return sorted(range(len(row)), key=lambda i: (-key[i], i))[: min(k, len(row))]


def ref_recall(ranked: list[int], targets: set[int], k: int) -> float:
    if not targets:
        return math.nan
    hits = sum(1 for i in ranked[:k] if i in targets)
    return hits / min(k, len(targets))


def ref_ndcg(ranked: list[int], targets: set[int], k: int) -> float:
    if not targets:
        return math.nan
    dcg = sum(1.0 / math.log2(r + 2) for r, i in enumerate(ranked[:k]) if i in targets)
    idcg = sum(1.0 / math.log2(r + 2) for r in range(min(k, len(targets))))
    return dcg / idcg


def _assert_close_nan(actual: torch.Tensor, expected: list[float], tol: float = 1e-5) -> None:
    assert actual.shape == (len(expected),)
    for a, e in zip(actual.tolist(), expected, strict=True):
        if math.isnan(e):
            assert math.isnan(a), (actual, expected)
        else:
            assert a == pytest.approx(e, abs=tol), (actual, expected)


# ---------------------------------------------------------------- hand-worked cases

# 5 items, scores rank the items as [3, 0, 1, 4, 2]; targets {1, 3}.
HAND_SCORES = torch.tensor([[0.8, 0.7, 0.1, 0.9, 0.3]])
HAND_TARGETS = _targets(5, [[1, 3]])


def test_topk_hand() -> None:
    assert topk_items(HAND_SCORES, 5).tolist() == [[3, 0, 1, 4, 2]]
    assert topk_items(HAND_SCORES, 2).tolist() == [[3, 0]]
    top = topk_items(HAND_SCORES, 2)
    assert top.dtype == torch.int64


def test_recall_hand() -> None:
    top = topk_items(HAND_SCORES, 5)
    # @1: top [3] -> 1 hit / min(1, 2) = 1
    assert recall_at_k(top, HAND_TARGETS, 1).tolist() == [1.0]
    # @2: top [3, 0] -> 1 hit / min(2, 2) = 0.5
    assert recall_at_k(top, HAND_TARGETS, 2).tolist() == [0.5]
    # @3: top [3, 0, 1] -> 2 hits / 2 = 1
    assert recall_at_k(top, HAND_TARGETS, 3).tolist() == [1.0]
    # @5: still 2 / min(5, 2) = 1 (not 2/5)
    assert recall_at_k(top, HAND_TARGETS, 5).tolist() == [1.0]


def test_ndcg_hand() -> None:
    top = topk_items(HAND_SCORES, 5)
    # @1: rel [1] -> DCG 1/log2(2) = 1, IDCG 1 -> 1
    assert ndcg_at_k(top, HAND_TARGETS, 1).item() == pytest.approx(1.0)
    # @2: rel [1, 0] -> DCG = 1; IDCG = 1 + 1/log2(3) = 1.63093 -> 0.61315
    assert ndcg_at_k(top, HAND_TARGETS, 2).item() == pytest.approx(1.0 / (1.0 + 1.0 / math.log2(3)), abs=1e-6)
    assert ndcg_at_k(top, HAND_TARGETS, 2).item() == pytest.approx(0.613147, abs=1e-5)
    # @3: rel [1, 0, 1] -> DCG = 1 + 1/log2(4) = 1.5; IDCG = 1.63093 -> 0.91972
    assert ndcg_at_k(top, HAND_TARGETS, 3).item() == pytest.approx(0.919721, abs=1e-5)
    # @5: rel [1, 0, 1, 0, 0] -> same DCG and IDCG (only 2 targets) -> 0.91972
    assert ndcg_at_k(top, HAND_TARGETS, 5).item() == pytest.approx(0.919721, abs=1e-5)


def test_ndcg_hit_at_rank_two_only() -> None:
    # 4 items, ranking [0, 1, 2, 3], target {1}: DCG@3 = 1/log2(3) = 0.63093; IDCG = 1 -> 0.63093
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    top = topk_items(scores, 3)
    assert ndcg_at_k(top, _targets(4, [[1]]), 3).item() == pytest.approx(0.630930, abs=1e-5)
    assert recall_at_k(top, _targets(4, [[1]]), 3).item() == 1.0
    # target {3} is ranked 4th: nothing in the top 3
    assert ndcg_at_k(top, _targets(4, [[3]]), 3).item() == 0.0
    assert recall_at_k(top, _targets(4, [[3]]), 3).item() == 0.0


def test_min_k_targets_denominator() -> None:
    # 6 items, ranking [0, 1, 2, 3, 4, 5], targets {0, 1, 4, 5} (4 targets), K = 2:
    # top-2 = [0, 1], 2 hits; recall = 2 / min(2, 4) = 1.0 (not 2/4 = 0.5);
    # NDCG: DCG = 1 + 1/log2(3), IDCG with min(2, 4) = 2 hits = same -> 1.0
    scores = torch.tensor([[6.0, 5.0, 4.0, 3.0, 2.0, 1.0]])
    tgt = _targets(6, [[0, 1, 4, 5]])
    top = topk_items(scores, 2)
    assert recall_at_k(top, tgt, 2).item() == 1.0
    assert ndcg_at_k(top, tgt, 2).item() == pytest.approx(1.0)
    # K = 3: top-3 [0, 1, 2] has 2 hits / min(3, 4) = 2/3;
    # NDCG = (1 + 1/log2 3) / (1 + 1/log2 3 + 1/log2 4) = 1.63093 / 2.13093 = 0.76536
    top3 = topk_items(scores, 3)
    assert recall_at_k(top3, tgt, 3).item() == pytest.approx(2 / 3)
    assert ndcg_at_k(top3, tgt, 3).item() == pytest.approx(0.765361, abs=1e-5)


def test_user_without_targets_is_nan_and_excluded() -> None:
    # user 0: hand case above (recall@2 = 0.5, ndcg@2 = 0.61315); user 1: no target.
    scores = torch.cat([HAND_SCORES, HAND_SCORES])
    tgt = _targets(5, [[1, 3], []])
    top = topk_items(scores, 2)
    rec = recall_at_k(top, tgt, 2)
    nd = ndcg_at_k(top, tgt, 2)
    assert rec[0].item() == 0.5 and math.isnan(rec[1].item())
    assert nd[0].item() == pytest.approx(0.613147, abs=1e-5) and math.isnan(nd[1].item())
    # the mean ignores user 1 (a plain mean would be NaN, a zero-filled one 0.25)
    assert mean_over_valid(rec) == 0.5
    assert mean_over_valid(nd) == pytest.approx(0.613147, abs=1e-5)


def test_mean_over_valid() -> None:
    assert mean_over_valid(torch.tensor([1.0, math.nan, 0.0, 0.5])) == pytest.approx(0.5)
    assert math.isnan(mean_over_valid(torch.tensor([math.nan, math.nan])))
    assert math.isnan(mean_over_valid(torch.tensor([])))
    assert mean_over_valid(torch.tensor([0.25], dtype=torch.bfloat16)) == 0.25
    assert isinstance(mean_over_valid(torch.tensor([0.25])), float)


def test_k_larger_than_n_items() -> None:
    # 3 items, ranking [0, 1, 2], target {2}, K = 10: top has only 3 columns.
    # recall@10 = 1 / min(10, 1) = 1; NDCG@10 = (1/log2(4)) / 1 = 0.5
    scores = torch.tensor([[3.0, 2.0, 1.0]])
    tgt = _targets(3, [[2]])
    top = topk_items(scores, 10)
    assert top.tolist() == [[0, 1, 2]]
    assert recall_at_k(top, tgt, 10).item() == 1.0
    assert ndcg_at_k(top, tgt, 10).item() == pytest.approx(0.5)
    assert coverage_at_k(top, 3, 10) == 1.0
    out = ranking_metrics(scores, tgt, ks_recall=(20, 50), ks_ndcg=(100,))
    assert out["recall@20"].item() == 1.0 and out["recall@50"].item() == 1.0
    assert out["ndcg@100"].item() == pytest.approx(0.5)


def test_coverage_hand() -> None:
    # 5 items; top-2 lists [3, 0], [3, 1], [0, 3] -> distinct {0, 1, 3} -> 3/5
    top = torch.tensor([[3, 0, 4], [3, 1, 2], [0, 3, 2]])
    assert coverage_at_k(top, 5, 2) == pytest.approx(0.6)
    # top-3 adds items 4 and 2 -> 5/5
    assert coverage_at_k(top, 5, 3) == 1.0
    # top-1: {3, 0} -> 2/5
    assert coverage_at_k(top, 5, 1) == pytest.approx(0.4)
    # items beyond the ones shown count in the denominator: 10-item catalog -> 3/10
    assert coverage_at_k(top, 10, 2) == pytest.approx(0.3)


def test_float_targets_equal_bool_targets() -> None:
    top = topk_items(HAND_SCORES, 5)
    ftgt = HAND_TARGETS.float()
    for k in (1, 2, 3, 5):
        assert torch.equal(recall_at_k(top, ftgt, k), recall_at_k(top, HAND_TARGETS, k))
        assert torch.equal(ndcg_at_k(top, ftgt, k), ndcg_at_k(top, HAND_TARGETS, k))


def test_perfect_ranking_is_one() -> None:
    gen = torch.Generator().manual_seed(3)
    n_users, n_items = 16, 40
    tgt = torch.rand(n_users, n_items, generator=gen) < 0.2
    tgt[:, 0] = True  # everyone has at least one target
    scores = torch.rand(n_users, n_items, generator=gen) + tgt.float() * 10.0  # targets score highest
    for k in (1, 3, 5, 20, 100):
        top = topk_items(scores, k)
        rec = recall_at_k(top, tgt, k)
        nd = ndcg_at_k(top, tgt, k)
        assert torch.allclose(rec, torch.ones(n_users)), (k, rec)
        assert torch.allclose(nd, torch.ones(n_users)), (k, nd)


def test_output_dtypes_and_shapes() -> None:
    scores = torch.randn(4, 9, dtype=torch.float64)
    tgt = torch.rand(4, 9) < 0.3
    top = topk_items(scores, 5)
    assert top.shape == (4, 5) and top.dtype == torch.int64
    assert recall_at_k(top, tgt, 5).dtype == torch.float32
    assert ndcg_at_k(top, tgt, 5).dtype == torch.float32
    assert topk_items(scores, 0).shape == (4, 0)


def test_bad_inputs_raise() -> None:
    scores = torch.randn(3, 6)
    tgt = torch.zeros(3, 6, dtype=torch.bool)
    with pytest.raises(ValueError):
        topk_items(scores[0], 2)  # 1-D
    with pytest.raises(ValueError):
        topk_items(scores, -1)
    with pytest.raises(ValueError):
        recall_at_k(topk_items(scores, 2), tgt, 5)  # top too narrow for k
    with pytest.raises(ValueError):
        ranking_metrics(scores, tgt[:, :5])


# ---------------------------------------------------------------- ties


def test_ties_go_to_lower_index() -> None:
    scores = torch.tensor(
        [
            [1.0, 0.0, 1.0, 1.0, 0.0],  # three-way tie at the top, cut at k=2
            [0.0, 0.0, 0.0, 0.0, 0.0],  # all equal
            [0.0, 2.0, 1.0, 2.0, 1.0],  # ties inside and at the cut
        ]
    )
    assert topk_items(scores, 2).tolist() == [[0, 2], [0, 1], [1, 3]]
    assert topk_items(scores, 3).tolist() == [[0, 2, 3], [0, 1, 2], [1, 3, 2]]
    assert topk_items(scores, 5).tolist() == [[0, 2, 3, 1, 4], [0, 1, 2, 3, 4], [1, 3, 2, 4, 0]]


def test_ties_at_cut_in_large_rows() -> None:
    # Many equal scores at the K-th place: torch.topk alone may pick any of them; the rule picks the
    # lowest indices. Row u: items 500.. score 1, everything else 0, with one item scoring 2.
    n_users, n_items, k = 6, 3000, 50
    scores = torch.zeros(n_users, n_items)
    scores[:, 500:] = 1.0
    scores[:, 2999] = 2.0
    top = topk_items(scores, k)
    expected = [2999, *range(500, 500 + k - 1)]
    assert top.tolist() == [expected] * n_users
    # all-zero rows: the first k items
    assert topk_items(torch.zeros(3, n_items), k).tolist() == [list(range(k))] * 3


def test_ties_mixed_batch_matches_reference() -> None:
    # Large rows (torch.topk's own choice among tied items is arbitrary there) mixing rows with no tie
    # at the cut, ties at the cut among high-indexed items, and rows with fewer open items than K.
    gen = torch.Generator().manual_seed(21)
    n_users, n_items, k = 12, 2000, 30
    scores = torch.randn(n_users, n_items, generator=gen)
    scores[1:4, 1500:] = 5.0  # 500 tied items above everything else, cut falls inside them
    scores[4:6, 1990:] = 9.0  # 10 clear winners, then 20 of the tied 5.0 block
    scores[4:6, 100:1500] = 5.0
    scores[6:8, 20:] = NEG_INF  # only 20 open items: the last 10 places go to masked items, low index
    scores[8, :] = NEG_INF  # everything masked
    scores[9, ::2] = 1.0  # half the items tie, including ones above and below in index
    top = topk_items(scores, k)
    for u in range(n_users):
        assert top[u].tolist() == ref_topk(scores[u].tolist(), k), u
    assert top[8].tolist() == list(range(k))
    assert top[6].tolist()[20:] == list(range(20, 30))
    assert set(top[6].tolist()[:20]) == set(range(20))


def test_ties_affect_metrics_deterministically() -> None:
    # items 0..3 tie; target {2}; K = 2 -> top [0, 1], no hit. With target {1}: hit at rank 2.
    scores = torch.zeros(1, 4)
    top = topk_items(scores, 2)
    assert recall_at_k(top, _targets(4, [[2]]), 2).item() == 0.0
    assert ndcg_at_k(top, _targets(4, [[1]]), 2).item() == pytest.approx(1.0 / math.log2(3))


def test_nan_scores_rank_last() -> None:
    scores = torch.tensor([[math.nan, 0.5, NEG_INF, 0.7]])
    assert topk_items(scores, 4).tolist() == [[3, 1, 0, 2]]  # NaN as -inf, tie with item 2 -> lower index


# ---------------------------------------------------------------- dtypes and devices


def test_bf16_scores() -> None:
    # bf16 has 8 mantissa bits: 1.0 and 1.001 round to the same value, so items 1 and 3 tie.
    raw = [[0.5, 1.0, -2.0, 1.001, 0.25, NEG_INF]]
    scores = torch.tensor(raw, dtype=torch.bfloat16)
    assert scores[0, 1] == scores[0, 3]
    top = topk_items(scores, 4)
    assert top.dtype == torch.int64
    assert top.tolist() == [[1, 3, 0, 4]]
    tgt = _targets(6, [[3, 4]])
    # @2: top [1, 3] -> 1 hit / 2; DCG 1/log2(3), IDCG 1 + 1/log2(3)
    assert recall_at_k(top, tgt, 2).item() == 0.5
    assert ndcg_at_k(top, tgt, 2).item() == pytest.approx(
        (1 / math.log2(3)) / (1 + 1 / math.log2(3)), abs=1e-6
    )
    # same results as the float32 copy of the bf16 values; metrics come back float32
    out16 = ranking_metrics(scores, tgt, ks_recall=(2, 4), ks_ndcg=(3,))
    out32 = ranking_metrics(scores.float(), tgt, ks_recall=(2, 4), ks_ndcg=(3,))
    for key in ("recall@2", "recall@4", "ndcg@3"):
        assert out16[key].dtype == torch.float32
        assert torch.equal(out16[key], out32[key])


def test_half_and_float64_scores_match_float32() -> None:
    gen = torch.Generator().manual_seed(11)
    scores = torch.randn(8, 30, generator=gen).half()  # values exactly representable in all three
    ref = topk_items(scores.float(), 10)
    assert torch.equal(topk_items(scores, 10), ref)
    assert torch.equal(topk_items(scores.double(), 10), ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu() -> None:
    gen = torch.Generator().manual_seed(5)
    scores = torch.randint(0, 5, (32, 200), generator=gen).float()  # many ties
    scores[torch.rand(32, 200, generator=gen) < 0.1] = NEG_INF
    tgt = torch.rand(32, 200, generator=gen) < 0.05
    cpu = ranking_metrics(scores, tgt, ks_recall=(5, 20), ks_ndcg=(50,))
    gpu = ranking_metrics(scores.cuda().bfloat16(), tgt.cuda(), ks_recall=(5, 20), ks_ndcg=(50,))
    assert torch.equal(topk_items(scores.cuda(), 50).cpu(), topk_items(scores, 50))
    for key, val in cpu.items():
        assert gpu[key].device.type == "cuda"
        assert torch.allclose(gpu[key].cpu(), val, equal_nan=True, atol=1e-6)
    assert coverage_at_k(topk_items(scores.cuda(), 20), 200, 20) == coverage_at_k(
        topk_items(scores, 20), 200, 20
    )


# ---------------------------------------------------------------- random cases vs. the reference


def _random_case(rng: random.Random, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
    n_users = rng.randint(1, 8)
    n_items = rng.randint(1, 60)
    k = rng.randint(1, 80)  # sometimes larger than n_items
    if rng.random() < 0.5:
        scores = torch.randint(0, 4, (n_users, n_items), generator=gen).float()  # heavy ties
    else:
        scores = torch.randn(n_users, n_items, generator=gen)
    fold_in = torch.rand(n_users, n_items, generator=gen) < rng.choice([0.0, 0.2, 0.6, 0.95])
    scores[fold_in] = NEG_INF
    # targets are held-out items, never fold-in items; some users get none
    p_target = rng.choice([0.0, 0.05, 0.3, 0.8])
    targets = (torch.rand(n_users, n_items, generator=gen) < p_target) & ~fold_in
    # other float dtypes; the reference reads the values back from the same tensor, so bf16/half
    # rounding (which creates more ties) is what both sides see
    scores = scores.to(
        rng.choice([torch.float32, torch.float32, torch.float64, torch.bfloat16, torch.float16])
    )
    return scores, targets, k


def test_against_reference_random() -> None:
    rng = random.Random(1234)
    gen = torch.Generator().manual_seed(1234)
    n_checked_masked = 0
    for _case in range(200):
        scores, targets, k = _random_case(rng, gen)
        n_users, n_items = scores.shape
        top = topk_items(scores, k)
        assert top.shape == (n_users, min(k, n_items))
        rec = recall_at_k(top, targets, k)
        nd = ndcg_at_k(top, targets, k)
        k_small = max(1, k // 3)
        rec_small = recall_at_k(top, targets, k_small)  # prefix of the same ranking
        seen: set[int] = set()
        valid_recalls: list[float] = []
        for u in range(n_users):
            row = scores[u].tolist()
            tset = {i for i in range(n_items) if targets[u, i]}
            ranked = ref_topk(row, k)
            assert top[u].tolist() == ranked, (u, row, k)
            seen.update(ranked[:k])
            ref_rec = ref_recall(ranked, tset, k)
            if not math.isnan(ref_rec):
                valid_recalls.append(ref_rec)
            _assert_close_nan(rec[u : u + 1], [ref_rec])
            _assert_close_nan(nd[u : u + 1], [ref_ndcg(ranked, tset, k)])
            _assert_close_nan(rec_small[u : u + 1], [ref_recall(ranked, tset, k_small)])
            n_open = sum(1 for v in row if v != NEG_INF)
            masked = {i for i, v in enumerate(row) if v == NEG_INF}
            if n_open >= min(k, n_items):
                assert not masked & set(top[u].tolist()), "fold-in item ranked in the top K"
                n_checked_masked += bool(masked)
            else:  # the few open items come first, then masked ones by index
                assert set(top[u, :n_open].tolist()).isdisjoint(masked)
        assert coverage_at_k(top, n_items, k) == pytest.approx(len(seen) / n_items)
        if valid_recalls:
            assert mean_over_valid(rec) == pytest.approx(sum(valid_recalls) / len(valid_recalls), abs=1e-6)
        else:
            assert math.isnan(mean_over_valid(rec))
    assert n_checked_masked > 50  # the masking check actually ran on rows with masked items


def test_ranking_metrics_matches_parts_and_ranks_once(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(7)
    scores = torch.randn(10, 150, generator=gen)
    tgt = torch.rand(10, 150, generator=gen) < 0.1
    tgt[0] = False  # a user without targets
    calls: list[int] = []
    real = metrics.topk_items

    def counting(s: torch.Tensor, k: int) -> torch.Tensor:
        calls.append(k)
        return real(s, k)

    monkeypatch.setattr(metrics, "topk_items", counting)
    out = ranking_metrics(scores, tgt)
    assert calls == [100]
    assert set(out) == {"recall@20", "recall@50", "ndcg@100"}
    top = real(scores, 100)
    for key, fn, k in (
        ("recall@20", recall_at_k, 20),
        ("recall@50", recall_at_k, 50),
        ("ndcg@100", ndcg_at_k, 100),
    ):
        assert out[key].shape == (10,)
        assert math.isnan(out[key][0].item())
        assert torch.allclose(out[key], fn(top, tgt, k), equal_nan=True)
        for u in range(1, 10):
            ranked = ref_topk(scores[u].tolist(), 100)
            tset = {i for i in range(150) if tgt[u, i]}
            ref = ref_recall(ranked, tset, k) if key.startswith("recall") else ref_ndcg(ranked, tset, k)
            assert out[key][u].item() == pytest.approx(ref, abs=1e-5)
    assert ranking_metrics(scores, tgt, ks_recall=(), ks_ndcg=()) == {}


def test_ranking_metrics_mixed_ks() -> None:
    # every K (smaller and larger than the others, and > n_items) must use its own prefix of the ranking
    gen = torch.Generator().manual_seed(8)
    n_users, n_items = 9, 70
    scores = torch.randint(0, 6, (n_users, n_items), generator=gen).float()
    tgt = torch.rand(n_users, n_items, generator=gen) < 0.15
    out = ranking_metrics(scores, tgt, ks_recall=(3, 50, 90), ks_ndcg=(2, 10, 200))
    assert set(out) == {"recall@3", "recall@50", "recall@90", "ndcg@2", "ndcg@10", "ndcg@200"}
    for u in range(n_users):
        ranked = ref_topk(scores[u].tolist(), n_items)
        tset = {i for i in range(n_items) if tgt[u, i]}
        for k in (3, 50, 90):
            _assert_close_nan(out[f"recall@{k}"][u : u + 1], [ref_recall(ranked, tset, k)])
        for k in (2, 10, 200):
            _assert_close_nan(out[f"ndcg@{k}"][u : u + 1], [ref_ndcg(ranked, tset, k)])
