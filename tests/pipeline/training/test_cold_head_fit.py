"""The weekly job's cold head (pipeline.training.cold_head_fit, issue 29): fitted from the snapshot's item_metadata
and saved in the registered bundle, so the daily job can score new titles; skipped, with the reason on the run,
when the snapshot has no metadata, no usable column, or the fit would exceed the memory budget."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import scipy.sparse as sp
import torch
from mlflow import MlflowClient

from model.cold_head import ColdHeadConfig, ColdHeadTuning
from model.cold_head_tuning import tune_cold_head
from model.ease import EASEConfig
from model.marec import top_k_columns
from model.recommenders import make_recommender
from model.sparse import DeviceCSR
from model.split import strong_generalization_split
from pipeline.data.build_matrix import item_metadata_table
from pipeline.data.synth import synth_interactions
from pipeline.io import registry
from pipeline.io.lake import resolve
from pipeline.io.snapshot import load_snapshot, snapshot_tables, write_run
from pipeline.training import cold_head_fit
from pipeline.training.cold_head_fit import fit_alignment, fit_cold_head, snapshot_items

from .conftest import NAME, tiny

N_USERS, N_ITEMS = 400, 60
ITEM_IDS = np.arange(1000, 1000 + N_ITEMS, dtype=np.int64)
NEW_ID = 5000


def genre(i: int) -> str:
    return f"g{i % 6}"


PLOTS = ("A detective hunts a killer in the city.", "Astronauts travel to a distant planet.",
         "Two strangers fall in love in Paris.", "A chef opens a restaurant by the sea.",
         "Soldiers fight a desperate battle in the war.", "A ghost haunts an old house at night.")


def items_table(ids: list[int], tags: bool = True, plots: bool = False) -> pa.Table:
    cols: dict[str, pa.Array] = {"item_id": pa.array(ids, pa.int64()), "title": pa.array([f"t{i}" for i in ids])}
    if tags:
        cols["tags"] = pa.array([[genre(i - 1000), "film"] for i in ids], pa.list_(pa.string()))
    if plots:  # one plot per genre: the text carries what the tags do
        cols["plot"] = pa.array([PLOTS[(i - 1000) % 6] for i in ids], pa.string())
    return pa.table(cols)


def train_matrix() -> sp.csr_matrix:
    f = synth_interactions(N_USERS, N_ITEMS, seed=2)
    x = sp.csr_matrix((np.ones(len(f), np.float32), (f.user_id, f.item_id)), shape=(N_USERS, N_ITEMS))
    x.sum_duplicates()
    x.data[:] = 1.0
    return x


def snapshot(tmp: Path, meta_ids: list[int] | None, tags: bool = True, cold_cols: tuple[int, ...] = (),
             plots: bool = False) -> str:
    """A snapshot like BuildMatrixJob's with `items` (the same join): item_metadata over `meta_ids`. `cold_cols`
    lose their training clicks (as titles clicked by held-out users only), so the join flags them cold."""
    split = strong_generalization_split(train_matrix(), seed=0, n_valid=40, n_test=40)
    if cold_cols:
        t = split.train.tolil()
        t[:, list(cold_cols)] = 0
        split = replace(split, train=sp.csr_matrix(t.tocsr(), dtype=np.float32))
        split.train.eliminate_zeros()
    tables = snapshot_tables(np.array([f"u{i}" for i in range(N_USERS)]), ITEM_IDS, split)
    if meta_ids is not None:
        warm = ITEM_IDS[np.asarray(split.train.sum(axis=0)).ravel() > 0]
        tables["item_metadata"] = item_metadata_table(items_table(meta_ids, tags, plots), ITEM_IDS, warm)
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


def test_a_plot_embedding_block_is_fitted_from_the_snapshot(tmp_path: Path) -> None:
    """cold_head.blocks may name "plot:wordllama": the head embeds the snapshot's plots (model inside the wheel)."""
    snap = load_snapshot(snapshot(tmp_path, [int(i) for i in ITEM_IDS], plots=True))
    rec = make_recommender("ease", ease=EASEConfig(l2=10.0)).fit(snap.train)
    # μ fixed: NNLS would weigh the plots 0 here, where they repeat the tags exactly
    cfg = ColdHeadConfig(delta=1.0, blocks=("tags", "plot:wordllama"), mu=(1.0, 1.0, 0.0))
    head, info = fit_cold_head(rec, snap, cfg, 2**30)
    assert head is not None and info["cold_head.blocks"] == "tags,plot:wordllama"
    assert head.warm_rows[1].shape == (N_ITEMS, 256)
    new = head.encode({"plot": ["A detective chases a killer through the city."]}, 1)  # a plot, no tags
    top = np.argsort(-head.similarity(new)[:, 0])[:5]
    assert all(i % 6 == 0 for i in top)  # the detective plot's titles first
    cols = head.cold_columns(new, rec.weights)
    assert np.isfinite(cols).all() and np.abs(cols).sum() > 0


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


COLD = (3, 9, 15)  # genre g3, g3, g3: the same genre as items 21, 27, ...


def test_alignment_covers_the_snapshots_cold_columns(tmp_path: Path) -> None:
    snap = load_snapshot(snapshot(tmp_path, [int(i) for i in ITEM_IDS], cold_cols=COLD))
    assert np.asarray(snap.train[:, list(COLD)].sum()) == 0
    target, info, head = fit_alignment(snap, ColdHeadConfig(delta=1.0), ab=0.5, max_bytes=2**30)
    assert target is not None and target.cols.tolist() == list(COLD) and head is not None and head.kind == "eq5"
    tuned = {k: v for k, v in info.items() if k.startswith("cold_head.tune")}  # the head's tuning, logged here too
    assert tuned["cold_head.tuned"].startswith(f"delta={head.delta:g} neighbours={head.neighbours} ")
    assert {k: v for k, v in info.items() if k not in tuned} == {
        "marec_align.status": "built", "marec_align.cold_items": 3, "marec_align.cold_items_with_metadata": 3,
        "marec_align.ab": 0.5}
    s = target.s_cols.numpy()
    assert s.shape == (N_ITEMS, 3) and target.alpha == 0.5
    same = [i for i in range(N_ITEMS) if i % 6 == 3 and i not in COLD]
    other = [i for i in range(N_ITEMS) if i % 6 != 3]
    assert s[same].mean() > 2 * s[other].mean()  # a cold g3 title is most like the other g3 titles
    assert (s[list(COLD)] == 0).all()  # cold titles are nobody's neighbours: only clicked columns align them


def test_neighbours_reach_the_head_and_the_run(tmp_path: Path) -> None:
    """cold_head.neighbours reaches the fitted head (its similarity is the dense one cut to each new title's k
    nearest) and the run's tags."""
    snap = load_snapshot(snapshot(tmp_path, [int(i) for i in ITEM_IDS], plots=True))
    rec = make_recommender("ease", ease=EASEConfig(l2=10.0)).fit(snap.train)
    # between two genres by its tags, nearer g3 by its plot (μ fixed: NNLS would weigh the repeated plots 0)
    new = {"tags": [["g2", "g3"]], "plot": ["A chef opens a restaurant by the sea."]}
    cfg = ColdHeadConfig(delta=1.0, blocks=("tags", "plot"), mu=(1.0, 1.0, 0.0), tune=None)  # as given
    dense, info0 = fit_cold_head(rec, snap, cfg, max_bytes=2**30)
    near, info = fit_cold_head(rec, snap, cfg.model_copy(update={"neighbours": 5}), max_bytes=2**30)
    assert dense is not None and near is not None and near.neighbours == 5
    assert (info0["cold_head.neighbours"], info["cold_head.neighbours"]) == (0, 5)
    s0 = dense.similarity(dense.encode(new, 1))
    s = near.similarity(near.encode(new, 1))
    np.testing.assert_array_equal(s, top_k_columns(s0, 5))
    genre = np.arange(N_ITEMS) % 6
    assert (s0[genre == 2] > 0).all() and (s0[genre == 3] > 0).all()
    assert (s[genre == 3] > 0).all() and (s[genre != 3] == 0).all()  # the ten tied g3 titles, nothing else


@pytest.mark.parametrize("family", ["ease", "multivae"])
def test_a_tuned_head_takes_the_pair_chosen_on_held_out_titles(tmp_path: Path, family: str) -> None:
    """cold_head.tune: δ and neighbours come from model.cold_head_tuning on the snapshot's training clicks (MARec's
    column for EASE, the metadata score otherwise), and the run logs the choice and the grid."""
    snap = load_snapshot(snapshot(tmp_path, [int(i) for i in ITEM_IDS], plots=True))
    rec: Any = make_recommender("ease", ease=EASEConfig(l2=10.0)).fit(snap.train) if family == "ease" else \
        SimpleNamespace(name="multivae")
    tuning = ColdHeadTuning(delta_grid=(1.0, 50.0), neighbours_grid=(0, 5), holdout=0.2)
    cfg = ColdHeadConfig(blocks=("tags", "plot"), tune=tuning)
    head, info = fit_cold_head(rec, snap, cfg, max_bytes=2**30)
    expect = tune_cold_head(snap.train, snapshot_items(snap.item_metadata, snap.n_items), cfg, tuning,
                            10.0 if family == "ease" else None)
    assert head is not None and (head.delta, head.neighbours) == (expect.delta, expect.neighbours)
    assert info["cold_head.tuned"] == expect.summary() and info["cold_head.tune_grid"].count("=") == 4
    assert (info["cold_head.delta"], info["cold_head.neighbours"]) == (expect.delta, expect.neighbours)


def test_too_little_to_tune_keeps_the_configured_pair(tmp_path: Path) -> None:
    snap = load_snapshot(snapshot(tmp_path, [int(i) for i in ITEM_IDS]))
    rec = make_recommender("ease", ease=EASEConfig(l2=10.0)).fit(snap.train)
    cfg = ColdHeadConfig(delta=3.0, neighbours=7, tune=ColdHeadTuning(holdout=0.01))  # 60 titles: none held out
    head, info = fit_cold_head(rec, snap, cfg, max_bytes=2**30)
    assert head is not None and (head.delta, head.neighbours) == (3.0, 7)
    assert info["cold_head.tuned"] == "no" and "too few to hold out" in info["cold_head.tune_reason"]


@pytest.mark.parametrize("case", ["off", "no metadata", "no cold column"])
def test_alignment_with_nothing_to_align_is_skipped_with_the_reason(tmp_path: Path, case: str) -> None:
    ids = [int(i) for i in ITEM_IDS]
    snap = load_snapshot(snapshot(tmp_path, None if case == "no metadata" else ids,
                                  cold_cols=() if case == "no cold column" else COLD))
    target, info, head = fit_alignment(snap, ColdHeadConfig(), ab=0.0 if case == "off" else 1.0, max_bytes=2**30)
    assert target is None and head is None
    assert info["marec_align.status"] == ("off" if case == "off" else "skipped")
    expected = {"off": "", "no metadata": "without items", "no cold column": "no cold item has a model column"}[case]
    assert expected in info.get("marec_align.reason", "")


def test_the_weekly_job_trains_the_aligned_multivae_and_registers_a_plain_one(tmp_path: Path, home: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """TrainJob with marec_align: the run says what was aligned, the cold columns leave the bottom of the ranking
    they sink to without it (no click ever pushes them up), and the registered bundle is an ordinary Multi-VAE
    whose cold head is the one the alignment was computed from (fitted once, not again for the bundle)."""
    uri = snapshot(tmp_path, [int(i) for i in ITEM_IDS], cold_cols=COLD)
    builds: list[str] = []
    real_build = cold_head_fit.build_cold_head

    def counted(rec: Any, *a: Any, **kw: Any) -> Any:
        builds.append(getattr(rec, "name", ""))
        return real_build(rec, *a, **kw)

    monkeypatch.setattr(cold_head_fit, "build_cold_head", counted)
    r = tiny(uri, baselines=False, diagnose=False, model="multivae", marec_align=0.5, epochs=15).run()
    assert len(builds) == 1
    tags = MlflowClient().get_run(r.run_id).data.tags
    assert tags["cold_head.status"] == "built" and tags["cold_head.kind"] == "eq5"
    assert tags["marec_align.status"] == "built" and tags["marec_align.cold_items"] == "3"
    bundle, _ = registry.load_bundle(f"models:/{NAME}/{r.version}")
    assert bundle.recommender.alignment is None and bundle.recommender.module.alignment is None
    plain = tiny(uri, baselines=False, diagnose=False, model="multivae", epochs=15).run()
    assert len(builds) == 2  # without the alignment the bundle's head is fitted once, for the bundle
    assert MlflowClient().get_run(plain.run_id).data.tags["marec_align.status"] == "off"
    base, _ = registry.load_bundle(f"models:/{NAME}/{plain.version}")
    snap = load_snapshot(uri)
    fans = sp.csr_matrix(snap.train[np.asarray(snap.train[:, [21, 27, 33]].sum(axis=1)).ravel() >= 2])

    def cold_rank(b: Any) -> float:  # mean rank of the cold titles among all 60 columns for g3 fans (0 = top)
        x = DeviceCSR.from_scipy(fans).batch(torch.arange(fans.shape[0]))
        order = (-b.recommender.score(x)).argsort(dim=1).argsort(dim=1).numpy()
        return float(order[:, list(COLD)].mean())

    plain_rank, aligned_rank = cold_rank(base), cold_rank(bundle)
    assert plain_rank > 50 and aligned_rank < 0.75 * plain_rank


def test_marec_align_is_refused_for_a_model_it_does_not_apply_to(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="marec_align applies to Multi-VAE/DAE models"):
        tiny("file:///nowhere", model="ease", marec_align=1.0)


def test_the_memory_check_counts_the_tuning_inverse_for_linear_heads_only() -> None:
    tuned, plain = ColdHeadConfig(), ColdHeadConfig(tune=None)
    assert cold_head_fit.head_bytes(1000, 2, tuned) == cold_head_fit.head_bytes(1000, 2, plain) == 12 * 10**6
    assert cold_head_fit.head_bytes(1000, 2, tuned, linear=True) == 16 * 10**6  # + K over the remaining clicks
    assert cold_head_fit.head_bytes(1000, 2, plain, linear=True) == 12 * 10**6
