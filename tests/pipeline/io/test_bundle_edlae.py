"""pipeline.io.bundle and issue 28's model changes: an EDLAE bundle round trip, and Multi-VAE bundles written before
VAEConfig had beta_schedule/anneal_fraction still load (with the Liang schedule they were trained with)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from model.ease import EDLAEConfig
from model.recommenders import EDLAE, make_recommender
from model.train import TrainConfig
from model.vae import VAEConfig
from pipeline.errors import DataError
from pipeline.io.bundle import ModelBundle


def data() -> sp.csr_matrix:
    rng = np.random.default_rng(1)
    return sp.csr_matrix((rng.random((90, 30)) < 0.2).astype(np.float32))


@pytest.mark.parametrize("zero_diagonal", [False, True])
def test_edlae_round_trips_with_identical_scores(tmp_path: Path, zero_diagonal: bool) -> None:
    x = data()
    cfg = EDLAEConfig(l2=20.0, dropout=0.3, zero_diagonal=zero_diagonal)
    rec = make_recommender("edlae", train=TrainConfig(device="cpu"), ease=cfg).fit(x)
    b = ModelBundle(rec, np.arange(500, 530, dtype=np.int64), np.asarray(x.sum(0)).ravel().astype(np.float32), "edlae")
    path = b.save(tmp_path / "edlae")
    assert json.loads((path / "bundle.json").read_text())["recommender"]["edlae"] == cfg.model_dump(mode="json")
    loaded = ModelBundle.load(path)
    assert type(loaded.recommender) is EDLAE and loaded.recommender.config == cfg  # type: ignore[attr-defined]
    h = x[:12]
    (a_top, a_scores), (b_top, b_scores) = b.recommend(h, 7), loaded.recommend(h, 7)
    np.testing.assert_array_equal(a_top, b_top)
    np.testing.assert_array_equal(a_scores, b_scores)


def test_an_edlae_bundle_with_a_bad_config_is_refused(tmp_path: Path) -> None:
    x = data()
    rec = make_recommender("edlae", train=TrainConfig(device="cpu")).fit(x)
    path = ModelBundle(rec, np.arange(30, dtype=np.int64), np.ones(30, np.float32), "edlae").save(tmp_path / "b")
    meta = json.loads((path / "bundle.json").read_text())
    meta["recommender"]["edlae"]["dropout"] = 1.0
    (path / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="invalid edlae configuration"):
        ModelBundle.load(path)


def test_a_multivae_bundle_from_before_the_beta_schedules_loads_as_liang(tmp_path: Path) -> None:
    x = data()
    rec = make_recommender("multivae", train=TrainConfig(epochs=1, batch_size=30, device="cpu", progress=False),
                           model_config=VAEConfig(hidden_dims=(16,), latent_dim=4)).fit(x)
    b = ModelBundle(rec, np.arange(30, dtype=np.int64), np.ones(30, np.float32), "multivae")
    path = b.save(tmp_path / "old")
    meta = json.loads((path / "bundle.json").read_text())
    for key in ("beta_schedule", "anneal_fraction"):  # what an older release wrote
        del meta["recommender"]["model_config"][key]
    (path / "bundle.json").write_text(json.dumps(meta))
    loaded = ModelBundle.load(path)
    assert loaded.recommender.model_config.beta_schedule == "liang"  # type: ignore[attr-defined]
    assert loaded.recommender.model_config.anneal_steps == 200_000  # type: ignore[attr-defined]
    np.testing.assert_array_equal(loaded.recommend(x[:5], 5)[1], b.recommend(x[:5], 5)[1])
