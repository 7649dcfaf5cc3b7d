"""pipeline.io.bundle: save/load round trip, the popularity fallback, the pyfunc predict contract, and loading that
runs no code and notices changed files."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from model.recommenders import make_recommender
from model.train import TrainConfig
from model.vae import VAEConfig
from pipeline.errors import DataError
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


# -- the bundle format: weights only, validated, checksummed (issue 32: items 6 and 7) --------------------------

class _Payload:
    """Unpickling this object creates `path` (a stand-in for any code a crafted pickle could run)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def _rewrite_meta(path: Path, **changes) -> None:
    meta = json.loads((path / "bundle.json").read_text())
    meta.update(changes)
    (path / "bundle.json").write_text(json.dumps(meta))


def _vouch_for(path: Path) -> None:
    """Record the current weights file's checksum in bundle.json, as a crafted bundle would."""
    data = (path / "recommender.pt").read_bytes()
    meta = json.loads((path / "bundle.json").read_text())
    meta["files"]["recommender.pt"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (path / "bundle.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("old_format", [False, True])
def test_a_crafted_pickle_is_refused_and_never_runs(tmp_path: Path, bundle: ModelBundle, old_format: bool) -> None:
    path = bundle.save(tmp_path / "b")
    marker = tmp_path / "pwned"
    torch.save({"module": _Payload(marker)}, path / "recommender.pt")  # an object, not tensors
    _vouch_for(path)  # checksums do not protect against whoever wrote the folder
    if old_format:
        _rewrite_meta(path, format_version=1)
    match = r"format 1 \(a pickled Python object" if old_format else r"recommender.pt is not a weights-only state dict"
    with pytest.raises(DataError, match=match + r".*Fix: retrain the model"):
        ModelBundle.load(path)
    m = BundleModel()
    with pytest.raises(DataError):
        m.load_context(SimpleNamespace(artifacts={"bundle": str(path)}))  # the pyfunc face loads the same way
    assert not marker.exists()


def test_format_1_bundles_are_refused_with_the_fix(tmp_path: Path, bundle: ModelBundle) -> None:
    path = bundle.save(tmp_path / "b")
    torch.save(bundle.recommender, path / "recommender.pt")  # format 1: the pickled recommender object
    (path / "bundle.json").write_text(json.dumps({"format_version": 1, "name": "multivae-pia", "config": {},
                                                  "snapshot_id": "s", "n_items": 40}))
    with pytest.raises(DataError, match=r"is format 1 .*not loaded: it could run code.*Fix: retrain the model"):
        ModelBundle.load(path)


@pytest.mark.parametrize("name", ["recommender.pt", "items.parquet"])
def test_a_flipped_byte_is_a_checksum_error_naming_the_file(tmp_path: Path, bundle: ModelBundle, name: str) -> None:
    path = bundle.save(tmp_path / "b")
    f = path / name
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"{re.escape(str(f))} does not match the checksum recorded in bundle.json"):
        ModelBundle.load(path)


@pytest.mark.parametrize(("change", "match"), [
    ({"recommender": {"model": "os.system"}}, "recommender model 'os.system' is not one of"),
    ({"n_items": "40"}, "n_items '40' is not a positive integer"),
    ({"config": []}, "config is not a JSON object"),
    ({"files": {}}, "no sha256/bytes recorded for recommender.pt"),
    ({"format_version": 99}, "has format 99"),
    ({"n_items": 41}, r"does not hold 41 rows"),
])
def test_a_malformed_description_is_refused(tmp_path: Path, bundle: ModelBundle, change: dict, match: str) -> None:
    path = bundle.save(tmp_path / "b")
    _rewrite_meta(path, **change)
    with pytest.raises(DataError, match=match):
        ModelBundle.load(path)


def test_weights_of_another_architecture_are_refused(tmp_path: Path, bundle: ModelBundle) -> None:
    path = bundle.save(tmp_path / "b")
    meta = json.loads((path / "bundle.json").read_text())
    meta["recommender"]["model_config"]["latent_dim"] = 8  # the weights are for latent_dim 4
    (path / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"recommender.pt does not match multivae-pia's architecture"):
        ModelBundle.load(path)


def test_not_json_and_missing_description_name_the_file(tmp_path: Path, bundle: ModelBundle) -> None:
    path = bundle.save(tmp_path / "b")
    (path / "bundle.json").write_text("{not json")
    with pytest.raises(DataError, match=rf"{re.escape(str(path / 'bundle.json'))} is not readable JSON"):
        ModelBundle.load(path)
    (path / "bundle.json").unlink()
    with pytest.raises(DataError, match=r"has no bundle\.json"):
        ModelBundle.load(path)


@pytest.mark.parametrize("name", ["popularity", "ease", "multidae", "recvae-pia"])
def test_every_model_round_trips_with_identical_scores(tmp_path: Path, name: str) -> None:
    from model.ease import EASEConfig
    from model.pia import PIAConfig
    from model.recvae import RecVAEConfig

    rng = np.random.default_rng(1)
    x = sp.csr_matrix((rng.random((90, 30)) < 0.2).astype(np.float32))
    cfg = {"multidae": VAEConfig(hidden_dims=(16,), latent_dim=4, variational=False),
           "recvae-pia": RecVAEConfig(hidden_dim=16, latent_dim=4)}.get(name)
    rec = make_recommender(name, train=TrainConfig(epochs=2, batch_size=30, device="cpu", progress=False),
                           model_config=cfg, ease=EASEConfig(), pia=PIAConfig(weight=0.5)).fit(x)
    b = ModelBundle(rec, np.arange(500, 530, dtype=np.int64), np.asarray(x.sum(0)).ravel().astype(np.float32), name)
    loaded = ModelBundle.load(b.save(tmp_path / name))
    assert type(loaded.recommender) is type(rec) and loaded.recommender.name == name
    h = x[:12]
    (a_top, a_scores), (b_top, b_scores) = b.recommend(h, 7), loaded.recommend(h, 7)
    np.testing.assert_array_equal(a_top, b_top)
    np.testing.assert_array_equal(a_scores, b_scores)
    assert loaded.item_ids.dtype == np.int64 and loaded.item_ids[0] == 500
    assert ModelBundle.load(loaded.save(tmp_path / "again")).recommend(h, 7)[0].tolist() == a_top.tolist()
    if name == "recvae-pia":
        assert loaded.recommender.best_epoch == rec.best_epoch and loaded.recommender.pia == rec.pia


def test_only_the_known_recommenders_can_be_saved(tmp_path: Path, bundle: ModelBundle) -> None:
    class Custom(type(bundle.recommender)):  # type: ignore[misc]
        name = "custom"

    rec = Custom.__new__(Custom)
    rec.__dict__.update(bundle.recommender.__dict__ | {"name": "custom"})
    with pytest.raises(ValueError, match="cannot save a Custom"):
        ModelBundle(rec, bundle.item_ids, bundle.popularity).save(tmp_path / "b")
    assert not (tmp_path / "b").exists()
