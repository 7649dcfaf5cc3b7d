"""The weekly job's cold head (pipeline.training.cold_head_fit, issue 29): fitted from the snapshot's item_metadata
and saved in the registered bundle, so the daily job can score new titles; skipped, with the reason on the run,
when the snapshot has no metadata, no usable column, or the fit would exceed the memory budget."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import scipy.sparse as sp
from mlflow import MlflowClient

from model.cold_head import ColdHeadConfig
from model.ease import EASEConfig
from model.recommenders import make_recommender
from model.split import strong_generalization_split
from pipeline.data.build_matrix import item_metadata_table
from pipeline.data.synth import synth_interactions
from pipeline.io import registry
from pipeline.io.lake import resolve
from pipeline.io.snapshot import load_snapshot, snapshot_tables, write_run
from pipeline.training.cold_head_fit import fit_cold_head, snapshot_items

from .conftest import NAME, tiny

N_USERS, N_ITEMS = 400, 60
ITEM_IDS = np.arange(1000, 1000 + N_ITEMS, dtype=np.int64)
NEW_ID = 5000


def genre(i: int) -> str:
    return f"g{i % 6}"


def items_table(ids: list[int], tags: bool = True) -> pa.Table:
    cols: dict[str, pa.Array] = {"item_id": pa.array(ids, pa.int64()), "title": pa.array([f"t{i}" for i in ids])}
    if tags:
        cols["tags"] = pa.array([[genre(i - 1000), "film"] for i in ids], pa.list_(pa.string()))
    return pa.table(cols)


def train_matrix() -> sp.csr_matrix:
    f = synth_interactions(N_USERS, N_ITEMS, seed=2)
    x = sp.csr_matrix((np.ones(len(f), np.float32), (f.user_id, f.item_id)), shape=(N_USERS, N_ITEMS))
    x.sum_duplicates()
    x.data[:] = 1.0
    return x


def snapshot(tmp: Path, meta_ids: list[int] | None, tags: bool = True) -> str:
    """A snapshot like BuildMatrixJob's with `items` (the same join): item_metadata over `meta_ids`."""
    split = strong_generalization_split(train_matrix(), seed=0, n_valid=40, n_test=40)
    tables = snapshot_tables(np.array([f"u{i}" for i in range(N_USERS)]), ITEM_IDS, split)
    if meta_ids is not None:
        warm = ITEM_IDS[np.asarray(split.train.sum(axis=0)).ravel() > 0]
        tables["item_metadata"] = item_metadata_table(items_table(meta_ids, tags), ITEM_IDS, warm)
    root = resolve(str(tmp / "snap"))
    write_run(root, tables, {"snapshot_id": "snap", "counts": {"users": N_USERS, "items": N_ITEMS}})
    return root.uri


def test_snapshot_items_follow_the_model_columns(tmp_path: Path) -> None:
    snap = load_snapshot(snapshot(tmp_path, [1003, 1001, NEW_ID]))  # out of order, one outside the matrix
    items = snapshot_items(snap.item_metadata, snap.n_items)
    assert set(items) == {"title", "tags"}
    assert len(items["tags"]) == N_ITEMS
    assert items["tags"][3] == ["g3", "film"] and items["title"][1] == "t1001"
    assert items["tags"][0] is None and items["title"][2] is None  # no metadata: None
    assert "t5000" not in items["title"]  # the new title has no model column


def test_ease_gets_a_marec_head_from_the_snapshot(tmp_path: Path) -> None:
    snap = load_snapshot(snapshot(tmp_path, [int(i) for i in ITEM_IDS]))
    rec = make_recommender("ease", ease=EASEConfig(l2=10.0)).fit(snap.train)
    head, info = fit_cold_head(rec, snap, ColdHeadConfig(delta=1.0), max_bytes=2**30)
    assert head is not None and head.kind == "marec" and head.n_items == N_ITEMS
    assert info["cold_head.status"] == "built" and info["cold_head.blocks"] == "tags"
    assert info["cold_head.items_with_metadata"] == N_ITEMS
    assert head.l2 == 10.0  # λ1 is the model's own
    cols = head.cold_columns(head.encode({"tags": [["g2", "film"]]}, 1), rec.weights)
    assert cols.shape == (N_ITEMS, 1) and np.isfinite(cols).all() and np.abs(cols).sum() > 0


@pytest.mark.parametrize("case", ["off", "no metadata", "no usable column", "over budget"])
def test_a_head_that_cannot_be_built_is_skipped_with_the_reason(tmp_path: Path, case: str) -> None:
    ids = [int(i) for i in ITEM_IDS]
    snap = load_snapshot(snapshot(tmp_path, None if case == "no metadata" else ids, tags=case != "no usable column"))
    rec = make_recommender("ease", ease=EASEConfig(l2=10.0)).fit(snap.train)
    cfg = None if case == "off" else ColdHeadConfig()
    head, info = fit_cold_head(rec, snap, cfg, max_bytes=1000 if case == "over budget" else 2**30)
    assert head is None
    assert info["cold_head.status"] == ("off" if case == "off" else "skipped")
    reason = info.get("cold_head.reason", "")
    expected = {"off": "", "no metadata": "without items", "no usable column": "no metadata block",
                "over budget": "max_dense_bytes"}[case]
    assert expected in reason


def test_the_registered_bundle_carries_the_head(tmp_path: Path, home: Path) -> None:
    """TrainJob end to end (tiny Multi-VAE + PIA, MLflow store of the test): the version's bundle has an eq5 head
    fitted on the snapshot's metadata, and the run says so; cold_head None trains one without."""
    uri = snapshot(tmp_path, [int(i) for i in ITEM_IDS])
    r = tiny(uri, baselines=False, diagnose=False).run()
    bundle, _ = registry.load_bundle(f"models:/{NAME}/{r.version}")
    assert bundle.cold_head is not None and bundle.cold_head.kind == "eq5"
    assert [b.name for b in bundle.cold_head.blocks] == ["tags"]
    tags = MlflowClient().get_run(r.run_id).data.tags
    assert tags["cold_head.status"] == "built" and tags["cold_head.kind"] == "eq5"
    r2 = tiny(uri, baselines=False, diagnose=False, cold_head=None).run()
    assert registry.load_bundle(f"models:/{NAME}/{r2.version}")[0].cold_head is None
    assert MlflowClient().get_run(r2.run_id).data.tags["cold_head.status"] == "off"
