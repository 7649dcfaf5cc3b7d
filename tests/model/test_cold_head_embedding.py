"""The cold head's sentence-embedding block ("plot:wordllama", model.text_encoder): a new title's plot is embedded at
serving with the model inside the wordllama wheel, centred on the fitted titles' mean, and compared with the warm
titles' plots; the block survives JSON; a bad encoder name is refused."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from model.cold_head import BlockFeaturizer, ColdHeadConfig, build_cold_head, fit_block

TOPICS = {
    "crime": ["A detective hunts a serial killer through the rainy streets of the city.",
              "Police officers investigate a murder and chase the gang behind it.",
              "A hard-boiled cop tracks down the killer of his partner.",
              "Two detectives race to solve a string of brutal murders."],
    "space": ["Astronauts travel to a distant planet to save humanity from extinction.",
              "A starship crew fights alien invaders at the edge of the galaxy.",
              "A lone astronaut is stranded on Mars and must survive.",
              "Explorers pass through a wormhole in search of a new home among the stars."],
    "romance": ["Two strangers fall in love during a summer in Paris.",
                "A shy writer and a florist slowly fall for each other.",
                "Old lovers meet again at a wedding and rekindle their romance.",
                "A love story between a young painter and a musician."],
}
PLOTS = [p for ps in TOPICS.values() for p in ps]
TOPIC = [t for t, ps in TOPICS.items() for _ in ps]


def clicks() -> sp.csr_matrix:
    """Users who click one topic's titles: the NNLS block weight has something to fit."""
    rng = np.random.default_rng(0)
    rows = []
    for u in range(90):
        topic = list(TOPICS)[u % 3]
        rows.append([1.0 if TOPIC[i] == topic and rng.random() < 0.8 else 0.0 for i in range(len(PLOTS))])
    return sp.csr_matrix(np.asarray(rows, np.float32))


def test_the_block_centres_on_the_fitted_titles_and_survives_json() -> None:
    b = fit_block("plot:wordllama", [*PLOTS, None])
    assert b.kind == "embedding" and b.column == "plot" and len(b.vocab) == 256 and len(b.lo) == 256
    z = b.transform([*PLOTS, None]).toarray()
    assert np.allclose(np.linalg.norm(z[:-1], axis=1), 1.0, atol=1e-5) and not z[-1].any()  # no text: empty row
    assert (z < 0).any()  # signed: not min-max scaled into one orthant
    again = BlockFeaturizer.from_json(b.to_json())
    new = ["A detective investigates a murder in the city.", ""]
    np.testing.assert_array_equal(again.transform(new).toarray(), b.transform(new).toarray())


def test_a_new_plot_is_closest_to_the_warm_titles_of_its_topic() -> None:
    rec = type("Fitted", (), {"name": "multivae"})()  # an autoencoder's head (eq5): the model is not consulted
    head = build_cold_head(rec, clicks(), {"plot": PLOTS}, ColdHeadConfig(blocks=("plot:wordllama",), delta=0.1))
    assert [b.name for b in head.blocks] == ["plot:wordllama"] and head.mu[0] > 0
    new = {"plot": ["An astronaut crew lands on an alien planet far from Earth.",
                    "A police detective chases a murderer.", None]}
    s = head.similarity(head.encode(new, 3))
    for j, topic in enumerate(("space", "crime")):
        inside = [i for i, t in enumerate(TOPIC) if t == topic]
        outside = [i for i, t in enumerate(TOPIC) if t != topic]
        top3 = np.argsort(-s[:, j])[:3]
        assert set(top3) <= set(inside) and s[inside, j].mean() > s[outside, j].mean() + 0.3
    assert not s[:, 2].any()  # a new title without a plot is like nothing


@pytest.mark.parametrize("block", ["plot:bert", "tags:wordllama", "plot:"])
def test_an_unknown_encoder_or_a_non_text_column_is_refused(block: str) -> None:
    with pytest.raises(ValueError, match="an encoder applies to a free-text column"):
        ColdHeadConfig(blocks=(block,))
