"""Metadata feature blocks and the smoothed cosine (model.metadata)."""

from __future__ import annotations

import numpy as np
import pytest

from model.metadata import decade_one_hot, minmax_columns, multi_hot, smoothed_cosine, tfidf, tokenize


def test_multi_hot_drops_values_on_fewer_than_two_items() -> None:
    z = multi_hot([["drama", "war"], ["drama"], None, ["solo", "war"]])
    assert z.shape == (4, 2)  # drama, war (solo is on one item)
    np.testing.assert_array_equal(z.toarray(), [[1, 1], [1, 0], [0, 0], [0, 1]])


def test_tfidf_keeps_shared_words_weights_rare_ones_higher_and_normalises_rows() -> None:
    texts = ["The thief steals a car", "a thief and a cop", "the cop chases a car car", "a cop", None]
    z = tfidf(texts, max_words=10).toarray()
    assert z.shape == (5, 3)  # car, cop, thief: words on >= 2 items, stop words out
    np.testing.assert_allclose(np.linalg.norm(z[:4], axis=1), 1.0, rtol=1e-6)
    assert not z[4].any()
    assert tokenize("The thief's CAR!") == ["thief's", "car"]
    # "cop" is on 3 items, "thief" on 2: in row 1 (thief, cop once each) thief weighs more
    vocab = ["cop", "car", "thief"]  # order by document frequency, then word
    assert z[1, vocab.index("thief")] > z[1, vocab.index("cop")]


def test_minmax_scales_each_column_to_unit_range() -> None:
    z = minmax_columns(np.array([[0.0, 2.0, 5.0], [1.0, 4.0, 5.0], [3.0, 3.0, 5.0]])).toarray()
    np.testing.assert_allclose(z, [[0, 0, 0], [1 / 3, 1, 0], [1, 0.5, 0]], atol=1e-6)


def test_smoothed_cosine_matches_the_formula_with_zero_diagonal() -> None:
    rng = np.random.default_rng(0)
    z = rng.random((6, 4)) * (rng.random((6, 4)) > 0.4)
    z[5] = 0  # an item without features
    g = smoothed_cosine(z, delta=2.0)
    n = np.linalg.norm(z, axis=1)
    want = (z @ z.T) / (np.outer(n, n) + 2.0)
    np.fill_diagonal(want, 0)
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7)
    assert not g[5].any() and not g[:, 5].any()
    # delta damps: plain cosine is larger everywhere it is positive
    g0 = smoothed_cosine(z, delta=0.0)
    assert (g0[g > 0] > g[g > 0]).all()
    with pytest.raises(ValueError):
        smoothed_cosine(z, delta=-1)


def test_decades() -> None:
    z = decade_one_hot([1994, 1999, None, 2001, 1875]).toarray()
    np.testing.assert_array_equal(z, [[1], [1], [0], [0], [0]])
