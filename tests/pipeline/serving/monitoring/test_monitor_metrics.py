"""The monitoring's metric functions on tiny tables whose answers are computed by hand, and the streaming
accumulator against the same numbers computed in one piece."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from pipeline.serving.monitoring.config import MonitorConfig, Rule, Threshold
from pipeline.serving.monitoring.metrics import (
    NO_RANK,
    OutputAccumulator,
    coverage_at,
    gini,
    list_overlap,
    lorenz,
    previous_exposure,
    quantiles,
    relative_change,
    sample_cut,
    summarize,
    top_share,
    total_variation,
)
from pipeline.serving.monitoring.rules import blocked_error, evaluate


def test_gini_of_even_exposure_is_zero_and_of_one_item_is_n_minus_one_over_n() -> None:
    assert gini(np.array([3, 3, 3, 3])) == pytest.approx(0.0)
    assert gini(np.array([0, 0, 0, 4])) == pytest.approx(0.75)  # (n-1)/n, n = 4
    # by hand: sorted [1, 2, 3, 4]: 2 * (1 + 4 + 9 + 16) / (4 * 10) - 5/4 = 1.5 - 1.25
    assert gini(np.array([4, 1, 3, 2])) == pytest.approx(0.25)
    assert gini(np.zeros(5)) == 0.0 and gini(np.zeros(0)) == 0.0


def test_top_share_takes_the_ceil_of_one_percent_of_the_items() -> None:
    x = np.ones(150)
    x[7] = 51.0  # total 200; ceil(1.5) = 2 items: 51 + 1
    assert top_share(x, 0.01) == pytest.approx(52 / 200)
    assert top_share(np.array([5.0, 5.0]), 0.01) == pytest.approx(0.5)  # at least one item


def test_lorenz_curve_runs_from_origin_to_one_under_the_diagonal() -> None:
    x, y = lorenz(np.array([0, 0, 0, 4]))
    assert (x[0], y[0], x[-1], y[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(y <= x + 1e-12)
    assert y[x == 0.75][0] == 0.0  # three least exposed items hold nothing


def test_coverage_at_k_from_best_ranks() -> None:
    first = np.array([0, 3, NO_RANK, 1, 9], np.int32)
    assert coverage_at(first, 1) == pytest.approx(1 / 5)
    assert coverage_at(first, 4) == pytest.approx(3 / 5)
    assert coverage_at(first, 100) == pytest.approx(4 / 5)


def test_relative_change_and_total_variation() -> None:
    assert relative_change(1.5, 1.0) == pytest.approx(0.5)
    assert relative_change(-1.0, -2.0) == pytest.approx(0.5)  # toward zero from a negative value is a rise
    assert relative_change(0.0, 0.0) == 0.0 and relative_change(1.0, 0.0) == math.inf
    assert relative_change(None, 1.0) is None and relative_change(1.0, None) is None
    assert total_variation(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 0.0
    assert total_variation(np.array([2.0, 0.0]), np.array([0.0, 2.0])) == pytest.approx(1.0)
    # p = (1, 0), q = (1/2, 0) + 1/2 outside: 0.5 * (1/2 + 0 + 1/2)
    assert total_variation(np.array([4.0, 0.0]), np.array([1.0, 0.0]), q_outside=1.0) == pytest.approx(0.5)


def test_quantiles_name_their_levels() -> None:
    q = quantiles(np.arange(101, dtype=np.float64))
    assert q is not None and q["p50"] == 50.0 and q["p05"] == 5.0 and q["p99"] == 99.0
    assert quantiles(np.zeros(0)) is None


def lists(users: list[int], items: list[list[int]]) -> pa.Table:
    return pa.table({"user_id": pa.array(users, pa.int64()), "item_ids": pa.array(items, pa.list_(pa.int64()))})


def test_list_overlap_and_jaccard_over_users_in_both_days() -> None:
    today = lists([1, 2, 3], [[10, 11, 12, 13], [20, 21], [30]])
    prev = lists([2, 1, 9], [[20, 22], [10, 11, 14, 15], [99]])  # user 3 absent the day before; 9 absent today
    overlap, jaccard, n = list_overlap(today, prev)  # type: ignore[misc]
    assert n == 2
    # user 1: |∩| = 2, longest 4 → 0.5, union 6 → 1/3; user 2: |∩| = 1, longest 2 → 0.5, union 3 → 1/3
    assert overlap == pytest.approx(0.5) and jaccard == pytest.approx(1 / 3)
    assert list_overlap(today, lists([7], [[10]])) is None
    same = list_overlap(today, today)
    assert same is not None and same[:2] == (1.0, 1.0)


def test_list_overlap_with_string_ids() -> None:
    t = pa.table({"user_id": ["a", "b"], "item_ids": [["x", "y"], ["z"]]})
    p = pa.table({"user_id": ["b", "a"], "item_ids": [["q"], ["y", "x"]]})
    overlap, jaccard, n = list_overlap(t, p)  # type: ignore[misc]
    assert (n, overlap, jaccard) == (2, pytest.approx(0.5), pytest.approx(0.5))


def published(users: list[int], items: list[list[int]], scores: list[list[float]], fallback: list[bool]) -> pa.Table:
    return pa.table({"user_id": pa.array(users, pa.int64()), "item_ids": pa.array(items, pa.list_(pa.int64())),
                     "scores": pa.array(scores, pa.list_(pa.float32())), "fallback": pa.array(fallback)})


def test_accumulator_counts_exposure_ranks_fallbacks_and_scores_by_hand() -> None:
    vocab = pa.array([100, 101, 102, 103], pa.int64())
    acc = OutputAccumulator(vocab)
    acc.add(published([1, 2], [[100, 101], [101, 102]], [[3.0, 2.0], [5.0, 1.0]], [False, False]).to_batches()[0])
    acc.add(published([3], [[101, 100]], [[0.6, 0.4]], [True]))  # a fallback row: popularity shares
    assert (acc.users, acc.fallback_users, acc.slots) == (3, 1, 6)
    assert acc.exposure.tolist() == [2, 3, 1, 0]
    assert acc.first_rank.tolist() == [0, 0, 1, NO_RANK]
    assert acc.moments("model") == {"count": 4, "mean": 2.75, "min": 1.0, "max": 5.0}
    assert acc.moments("fallback") == pytest.approx({"count": 2, "mean": 0.5, "min": 0.4, "max": 0.6})
    sample = acc.sample()
    m = summarize(acc, top_n=2, sample=sample)
    assert m["users"] == 3 and m["fallback_rate"] == pytest.approx(1 / 3)
    assert m["coverage"] == pytest.approx(3 / 4)
    assert m["gini"] == pytest.approx(gini(np.array([2, 3, 1, 0])))
    assert m["top1pct_share"] == pytest.approx(3 / 6)
    assert m["score_p50"] == pytest.approx(2.5) and m["fallback_score_p50"] == pytest.approx(0.5)
    assert m["cold_item_share"] is None  # no engine writes the cold column yet


def test_lists_of_different_lengths_rank_from_each_list_start() -> None:
    acc = OutputAccumulator(pa.array([1, 2, 3, 4], pa.int64()))
    acc.add(published([7, 8, 9], [[1, 2, 3], [2], []], [[3.0, 2.0, 1.0], [4.0], []], [False, False, True]))
    assert acc.first_rank.tolist() == [0, 0, 2, NO_RANK] and acc.exposure.tolist() == [1, 2, 1, 0]
    assert (acc.slots, acc.fallback_users) == (4, 1) and acc.moments("fallback") is None


def test_cold_column_hook_gives_the_cold_slot_share() -> None:
    acc = OutputAccumulator(pa.array([1, 2, 3], pa.int64()))
    t = published([7, 8], [[1, 2], [3, 1]], [[1.0, 0.5], [1.0, 0.5]], [False, False])
    acc.add(t.append_column("cold", pa.array([[False, True], [True, True]], pa.list_(pa.bool_()))))
    assert summarize(acc, 2, acc.sample())["cold_item_share"] == pytest.approx(3 / 4)


def test_streaming_in_many_batches_equals_one_batch_and_the_sample_is_deterministic() -> None:
    rng = np.random.default_rng(0)
    n_items, n_users, k = 300, 2_000, 10
    vocab = pa.array(np.arange(5000, 5000 + n_items), pa.int64())
    items = [list(5000 + rng.choice(n_items, k, replace=False)) for _ in range(n_users)]
    scores = [sorted(rng.random(k).tolist(), reverse=True) for _ in range(n_users)]
    table = published(list(range(n_users)), items, scores, [False] * n_users)
    whole = OutputAccumulator(vocab, sample_cut(n_users, 100), 100)
    whole.add(table)
    parts = OutputAccumulator(vocab, sample_cut(n_users, 100), 100)
    for b in table.to_batches(max_chunksize=137):
        parts.add(b)
    assert np.array_equal(whole.exposure, parts.exposure) and np.array_equal(whole.first_rank, parts.first_rank)
    s1, s2 = whole.sample(), parts.sample()
    assert s1 is not None and s2 is not None and s1.num_rows == 100
    assert s1.column("user_id").to_pylist() == s2.column("user_id").to_pylist()
    assert summarize(whole, k, s1) == summarize(parts, k, s2)


def test_previous_exposure_maps_ids_and_keeps_the_mass_outside_the_vocabulary() -> None:
    vocab = pa.array([10, 11, 12], pa.int64())
    q, outside = previous_exposure(vocab, pa.array([12, 99, 10], pa.int64()), np.array([3, 5, 1]))
    assert q.tolist() == [1.0, 0.0, 3.0] and outside == 5.0


def test_rules_block_and_warn_with_the_metric_value_and_threshold_in_the_message() -> None:
    cfg = MonitorConfig(rules={"coverage": Rule(max_drop=Threshold(value=0.5, action="block")),
                               "fallback_rate": Rule(max=Threshold(value=0.1)),
                               "gini": Rule(max_drift=Threshold(value=0.2, action="warn"))})
    findings = evaluate(cfg, {"coverage": 0.1, "fallback_rate": 0.3, "gini": 0.5, "overlap": None},
                        {"coverage": 0.4, "gini": 0.5})
    assert [(f.metric, f.bound, f.action) for f in findings] == [("coverage", "max_drop", "block"),
                                                                  ("fallback_rate", "max", "warn")]
    assert findings[0].change == pytest.approx(0.75)
    err = blocked_error(findings, "2024-05-03", "7")
    assert "coverage dropped by 75.0%" in str(err) and "max_drop 50.0%" in str(err) and "coverage.max_drop" in str(err)
    assert "fallback_rate" not in str(err)  # a warning is not the reason of a block
    assert evaluate(cfg, {"coverage": 0.1}, None) == []  # no previous date: no drift to check
