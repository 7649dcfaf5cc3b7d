"""Feature blocks from the items contract, and their content-hash cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import pipeline.data.item_features as item_features
from pipeline.data.item_features import content_key, default_blocks, feature_blocks


def _items() -> pd.DataFrame:
    return pd.DataFrame({"item_id": [10, 11, 12, 13], "tags": [["a", "b"], ["a"], [], ["b", "c"]],
                         "type": ["TV", "Movie", "TV", None], "plot": ["a thief runs", "the thief", None, "runs far"],
                         "year": [1994.0, 1999.0, np.nan, 2003.0], "members": [1, 2, 3, 4]}).set_index("item_id")


def test_blocks_follow_the_columns_and_are_scaled() -> None:
    items = _items()
    assert default_blocks(items.columns) == ["tags", "type", "plot", "year"]
    blocks = feature_blocks(items, np.array([10, 11, 12, 13, 99]), default_blocks(items.columns))
    assert list(blocks) == ["tags", "type", "plot", "year"]
    assert blocks["year"].shape == (5, 1)  # the 1990s (two items); the 2000s has one item
    np.testing.assert_array_equal(blocks["tags"].toarray(), [[1, 1], [1, 0], [0, 0], [0, 1], [0, 0]])  # c on 1 item
    assert blocks["type"].shape == (5, 1)  # TV twice; Movie once
    assert blocks["plot"].max() == pytest.approx(1.0)  # min-max per column
    assert blocks["plot"][4].nnz == 0  # an id without metadata: an empty row


def test_cache_is_reused_for_the_same_content_and_missed_for_new(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    items, ids, names = _items(), np.array([10, 11, 12, 13]), ["tags", "plot"]
    first = feature_blocks(items, ids, names, tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 1
    monkeypatch.setattr(item_features, "build_block", lambda *a: (_ for _ in ()).throw(AssertionError("rebuilt")))
    again = feature_blocks(items, ids, names, tmp_path)
    assert list(again) == list(first) and all((again[n] != first[n]).nnz == 0 for n in first)
    changed = items.copy()
    changed.loc[12, "tags"] = ["a"]
    assert content_key(changed, names, ids) != content_key(items, names, ids)
    assert content_key(items, names, ids[::-1]) != content_key(items, names, ids)
    with pytest.raises(AssertionError, match="rebuilt"):
        feature_blocks(changed, ids, names, tmp_path)
