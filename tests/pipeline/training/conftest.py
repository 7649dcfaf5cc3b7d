"""Fixtures of the training/gate/promotion tests: one pre-migrated SQLite MLflow store per session, a small
synthetic snapshot, and a session-wide store holding two trained versions that each test copies (so aliases,
tags and the ledger are private to the test while training happens once)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from model.split import strong_generalization_split
from model.vae import VAEConfig
from pipeline.data.synth import synth_interactions
from pipeline.io.snapshot import write_snapshot

NAME = "recsys-test"
TINY_VAE = VAEConfig(hidden_dims=(32,), latent_dim=8, anneal_steps=100)


def tiny(snapshot: str, **kw):
    """A tiny, fast TrainJob (kw override)."""
    from pipeline.training.train_job import TrainJob

    base = {"snapshot": snapshot, "epochs": 5, "lr": 3e-3, "batch_size": 100, "vae": TINY_VAE, "device": "cpu",
            "compare_base": False, "registered_name": NAME, "patience": None}
    return TrainJob(**(base | kw))


def gate(version: str, **kw):
    """GateJob(model_name=NAME, version=version, **kw).run()."""
    from pipeline.training.gate import GateJob

    return GateJob(model_name=NAME, version=version, **kw).run()


def promote(version: str, reason: str, **kw):
    """PromoteJob(model_name=NAME, ...).run()."""
    from pipeline.training.promotion import PromoteJob

    return PromoteJob(model_name=NAME, version=version, reason=reason, **kw).run()


def rollback(**kw):
    """RollbackJob(model_name=NAME, **kw).run()."""
    from pipeline.training.promotion import RollbackJob

    return RollbackJob(model_name=NAME, **kw).run()


def aliases() -> dict[str, str]:
    """NAME's aliases now."""
    from pipeline.training.aliases import aliases as of

    return of(NAME)


def events() -> list[str]:
    """The default ledger's events, oldest first."""
    from pipeline.training.ledger import Ledger

    return [e["event"] for e in Ledger().read()]


def state() -> tuple[dict[str, str], list[dict]]:
    """Aliases and ledger: what a refused command must leave as it was."""
    from pipeline.training.ledger import Ledger

    return aliases(), Ledger().read()


def point_at(mp: pytest.MonkeyPatch, home: Path) -> None:
    """Make `home` the RECSYS_HOME, with no remote tracking or ledger override leaking in from the shell."""
    mp.setenv("RECSYS_HOME", str(home))
    for k in ("MLFLOW_TRACKING_URI", "RECSYS_LEDGER", "RECSYS_ARTIFACT_LOCATION"):
        mp.delenv(k, raising=False)


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow SQLite store, migrated once (migration takes seconds; copying the file is instant)."""
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture(scope="session")
def synth_snapshot(tmp_path_factory: pytest.TempPathFactory) -> str:
    n_users, n_items = 600, 150
    f = synth_interactions(n_users, n_items, seed=1)
    x = sp.csr_matrix((np.ones(len(f), np.float32), (f.user_id, f.item_id)), shape=(n_users, n_items))
    x.sum_duplicates()
    x.data[:] = 1.0
    split = strong_generalization_split(x, seed=0, n_valid=60, n_test=60)
    return write_snapshot(str(tmp_path_factory.mktemp("snap") / "snap-synth"), np.array([f"u{i}" for i in range(n_users)]),
                          np.arange(1000, 1000 + n_items, dtype=np.int64), split)


@pytest.fixture
def home(tmp_path: Path, migrated_db: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh RECSYS_HOME with an already-migrated, empty store."""
    shutil.copy(migrated_db, tmp_path / "mlflow.db")
    point_at(monkeypatch, tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def trained_template(tmp_path_factory: pytest.TempPathFactory, migrated_db: Path, synth_snapshot: str) -> dict[str, str]:
    """Two versions of NAME, trained once: v1 good (5 epochs), v2 worse (1 epoch at a tiny learning rate)."""
    home = tmp_path_factory.mktemp("trained-home")
    shutil.copy(migrated_db, home / "mlflow.db")
    with pytest.MonkeyPatch.context() as mp:
        point_at(mp, home)
        good = tiny(synth_snapshot, compare_base=True).run()
        bad = tiny(synth_snapshot, epochs=1, lr=1e-6, seed=1).run()
    return {"home": str(home), "good": good.version, "bad": bad.version, "good_run": good.run_id}


@pytest.fixture
def trained(tmp_path: Path, trained_template: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """A private copy of the trained store (the db: aliases, tags; artifacts stay shared and read-only in effect)."""
    shutil.copy(Path(trained_template["home"]) / "mlflow.db", tmp_path / "mlflow.db")
    point_at(monkeypatch, tmp_path)
    yield trained_template | {"home": str(tmp_path)}


@pytest.fixture
def easy_gates():
    """Gates a tiny model passes (the tiny model is about as good as popularity, far from EASE)."""
    from pipeline.training.gates import GateConfig

    return GateConfig(floors={"ndcg@100": 0.05}, popularity_margin=-0.5, ease_margin=0.9, coverage_floor=0.05)


def cwd_has_mlruns() -> bool:
    return Path(os.getcwd(), "mlruns").exists()


def copy_version(of: str, **tags: str) -> str:
    """A new version of NAME with the weights and tags of version `of` (gate.* dropped; `tags` override)."""
    from pipeline.io import registry

    c = registry.client()
    mv = c.get_model_version(NAME, of)
    keep = {k: v for k, v in mv.tags.items() if not k.startswith("gate.")} | tags
    return str(c.create_model_version(NAME, mv.source, run_id=mv.run_id, tags=keep).version)


def snapshot_digest(uri: str) -> str:
    """The digest training records as the version tag `snapshot_digest`."""
    from pipeline.io.snapshot import manifest_digest, read_manifest

    return manifest_digest(read_manifest(uri))
