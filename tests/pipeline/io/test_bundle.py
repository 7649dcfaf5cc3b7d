"""pipeline.io.bundle: save/load round trip, the popularity fallback, and the pyfunc predict contract."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from model.recommenders import make_recommender
from model.train import TrainConfig
from model.vae import VAEConfig
from pipeline.io.bundle import ModelBundle
from pipeline.io.pyfunc import BundleModel


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    rng = np.random.default_rng(0)
    x = sp.csr_matrix((rng.random((120, 40)) < 0.15).astype(np.float32))
    rec = make_recommender("multivae-pia", train=TrainConfig(epochs=1, batch_size=40, device="cpu", progress=False),
                           model_config=VAEConfig(hidden_dims=(16,), latent_dim=4)).fit(x)
    pop = np.asarray(x.sum(0)).ravel().astype(np.float32)
    return ModelBundle(rec, np.array([f"i{c}" for c in range(40)]), pop, "multivae-pia", {"epochs": 1}, "snap-1")


def test_save_load_gives_the_same_recommendations(tmp_path: Path, bundle: ModelBundle) -> None:
    loaded = ModelBundle.load(bundle.save(tmp_path / "b"))
    h = sp.csr_matrix(np.eye(5, 40, dtype=np.float32))
    a, b = bundle.recommend(h, 10), loaded.recommend(h, 10)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_allclose(a[1], b[1], rtol=1e-6)
    assert list(loaded.item_ids[:2]) == ["i0", "i1"] and loaded.snapshot_id == "snap-1"


def test_mismatched_vocabulary_is_rejected(bundle: ModelBundle) -> None:
    with pytest.raises(ValueError, match="same item columns"):
        ModelBundle(bundle.recommender, bundle.item_ids[:-1], bundle.popularity[:-1])


def test_pyfunc_predict_maps_ids_filters_seen_and_falls_back(tmp_path: Path, bundle: ModelBundle) -> None:
    path = bundle.save(tmp_path / "b")
    m = BundleModel()
    m.load_context(SimpleNamespace(artifacts={"bundle": str(path)}))
    out = m.predict(None, pd.DataFrame({"item_ids": [["i1", "i2", "unknown"], ["nope"], []]}), {"k": 5})
    assert list(out["fallback"]) == [False, True, True]
    assert len(out["item_ids"][0]) == 5 and not {"i1", "i2"} & set(out["item_ids"][0])
    assert out["scores"][0] == sorted(out["scores"][0], reverse=True)
    fb, _ = bundle.fallback(5)
    assert out["item_ids"][1] == [f"i{c}" for c in fb]
    assert bundle.popularity[fb].tolist() == sorted(bundle.popularity.tolist(), reverse=True)[:5]


def test_saved_config_holds_no_credentials(tmp_path: Path, bundle: ModelBundle) -> None:
    secret = {"tracking_uri": "https://alice:s3cret@mlflow.example.com/?token=t0k", "epochs": 1,
              "nested": {"uri": "https://bob:hunter2@host"}}
    b = ModelBundle(bundle.recommender, bundle.item_ids, bundle.popularity, "multivae-pia", secret, "snap-1")
    path = b.save(tmp_path / "b")
    text = (path / "bundle.json").read_text()
    assert not [w for w in ("alice", "s3cret", "t0k", "bob", "hunter2") if w in text]
    loaded = ModelBundle.load(path)
    assert loaded.config["tracking_uri"] == "https://mlflow.example.com/?token=***"
    assert loaded.config["nested"] == {"uri": "https://host"} and loaded.config["epochs"] == 1
    assert b.config["tracking_uri"] == secret["tracking_uri"]  # the in-memory bundle is not altered
