"""Sentence embeddings of item text (pipeline.data.text_embedding): the model ships inside the wordllama wheel and
loads with no network; the blocks feed MARec's similarities like TF-IDF does."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from model import text_encoder
from model.metadata import smoothed_cosine
from pipeline.data import text_embedding
from pipeline.data.item_features import build_block, feature_blocks
from pipeline.errors import DataError

PLOTS = ["A detective hunts a serial killer through the rainy streets of the city.",
         "A police inspector tracks a murderer across a dark, wet town.",
         "Two talking toys compete for the love of a little boy.",
         None]


def test_the_model_loads_and_embeds_with_no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the text model tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    text_encoder._wordllama.cache_clear()
    z = text_embedding.sentence_embeddings(PLOTS).toarray()
    assert z.shape == (4, 256) and z.dtype == np.float32
    assert z[3].sum() == 0  # no text: an empty row, similar to nothing
    np.testing.assert_allclose(np.linalg.norm(z[:3], axis=1), 1.0, rtol=1e-5)  # centred, then L2-normalised
    assert z[:3].min() < 0 < z[:3].max()
    g = smoothed_cosine(text_embedding.sentence_embeddings(PLOTS), 0.0)
    assert g[0, 1] > g[0, 2] and g[1, 0] > g[1, 2]  # the two crime plots are the closest pair
    assert g[3].sum() == 0


def test_build_block_picks_the_encoder_and_refuses_a_bad_one() -> None:
    items = pd.DataFrame({"plot": PLOTS, "tags": [["crime"], ["crime"], ["kids"], []]}, index=[10, 11, 12, 13])
    ids = np.array([10, 11, 12, 13, 99])  # 99: unknown, an empty row
    emb = build_block(items, "plot:wordllama", ids)
    assert emb.shape == (5, 256) and emb[4].nnz == 0 and emb[3].nnz == 0
    assert build_block(items, "plot", ids).shape[1] < 256  # TF-IDF by default
    with pytest.raises(DataError, match="an encoder applies to a free-text column"):
        build_block(items, "tags:wordllama", ids)
    with pytest.raises(DataError, match="one of tfidf, wordllama"):
        build_block(items, "plot:bert", ids)
    with pytest.raises(DataError, match="no column 'synopsis'"):
        build_block(items, "synopsis:wordllama", ids)


def test_embedding_blocks_are_cached_apart_from_tfidf(tmp_path: Path) -> None:
    plots = ["a dark crime story", "a dark crime tale", "a kids story", None]
    items = pd.DataFrame({"plot": plots}, index=[10, 11, 12, 13])
    ids = np.array([10, 11, 12, 13])
    a = feature_blocks(items, ids, ["plot:wordllama"], tmp_path)
    b = feature_blocks(items, ids, ["plot"], tmp_path)
    assert list(a) == ["plot:wordllama"] and list(b) == ["plot"] and len(list(tmp_path.iterdir())) == 2
    assert a["plot:wordllama"].min() < 0  # signed: not min-max scaled like the other blocks
    again = feature_blocks(items, ids, ["plot:wordllama"], tmp_path)
    assert (again["plot:wordllama"] != a["plot:wordllama"]).nnz == 0
