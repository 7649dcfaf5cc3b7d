"""The cold-start protocol (pipeline/research/cold_start.py) on a toy set whose clicks follow item genres."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

from pipeline.cli.main import main
from pipeline.data.item_features import default_blocks
from pipeline.errors import DataError
from pipeline.research.cold_start import ColdStartJob, cold_split

N_USERS, N_ITEMS, N_GENRES = 400, 150, 8


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Users click items of their two favourite genres (and some noise); items carry their genres and a plot."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("data")
    genres = [sorted(set(rng.choice(N_GENRES, size=rng.integers(1, 3), replace=False).tolist())) for _ in range(N_ITEMS)]
    words = [f"word{g}" for g in range(N_GENRES)]
    rows = []
    for u in range(N_USERS):
        fav = set(rng.choice(N_GENRES, size=2, replace=False).tolist())
        liked = [i for i in range(N_ITEMS) if fav & set(genres[i])]
        picks = set(rng.choice(liked, size=min(len(liked), 15), replace=False).tolist())
        picks |= set(rng.choice(N_ITEMS, size=3, replace=False).tolist())
        rows += [(u, i) for i in sorted(picks)]
    (root / "toy").mkdir()
    pd.DataFrame(rows, columns=["user_id", "item_id"]).astype("int32").to_parquet(root / "toy" / "interactions.parquet")
    pq.write_table(pa.table({
        "item_id": pa.array(range(N_ITEMS), pa.int32()),
        "title": [f"t{i}" for i in range(N_ITEMS)],
        "tags": [[f"g{g}" for g in gs] for gs in genres],
        "plot": [" ".join(words[g] for g in gs) + " the story" for gs in genres],
        "members": list(range(N_ITEMS)),  # a popularity statistic: never a feature
    }), root / "toy" / "items.parquet")
    return root


def test_cold_split_keeps_cold_clicks_out_of_training() -> None:
    rng = np.random.default_rng(1)
    x = sp.csr_matrix((rng.random((50, 40)) < 0.3).astype(np.float32))
    s = cold_split(x, seed=3)
    cold = np.concatenate([s.cold_val_items, s.cold_test_items])
    assert len(cold) == 8 and len(set(cold.tolist())) == 8  # 20% of 40, halved, disjoint
    assert s.train[:, cold].nnz == 0 and s.warm_val[:, cold].nnz == 0
    assert s.cold_val[:, s.cold_test_items].nnz == 0 and s.cold_test[:, s.cold_val_items].nnz == 0
    total = s.train + s.warm_val + s.warm_test + s.cold_val + s.cold_test
    assert (total != x).nnz == 0  # every click in exactly one part
    assert 0.7 < s.train.nnz / (s.train.nnz + s.warm_val.nnz + s.warm_test.nnz) < 0.9


def test_default_blocks_leave_out_popularity_and_repeated_tags() -> None:
    assert default_blocks(["item_id", "title", "tags", "plot", "members", "year"]) == ["tags", "plot", "year"]
    assert default_blocks(["tags", "genres", "user_tags"]) == ["genres"]


def test_marec_beats_random_on_cold_items_and_results_are_written(toy: Path, tmp_path: Path) -> None:
    job = ColdStartJob(dataset="toy", data_dir=toy, out=tmp_path / "out", seeds=2, delta_grid=(1.0, 50.0),
                       l2_grid=(10.0, 100.0), ab_grid=(0.0, 1.0), knn_grid=(20, 0))
    res = job.run().results
    assert res["blocks"] == {"tags": N_GENRES, "plot": N_GENRES + 1}  # plot: the genre words and "story"
    cold = res["cold"]
    assert set(cold) >= {"random (= ease)", "popularity-among-cold", "meta-knn", "marec", "marec-eq5",
                         "marec (no text)", "marec (with text)", "marec-eq5 (no text)"}
    assert cold["marec"]["ndcg@10"]["mean"] > 1.5 * cold["random (= ease)"]["ndcg@10"]["mean"]
    assert cold["marec"]["ndcg@10"]["std"] is not None and len(res["per_seed"]) == 2
    # EASE in the whole catalogue never shows a cold item: its cold-target hits are exactly 0
    assert res["catalogue"]["ease"]["cold"]["recall@25"]["mean"] == 0.0
    assert set(res["catalogue"]) == {"ease", "marec", "marec (warm guard)"}
    assert res["gain"]["ndcg@25"]["best_baseline"] in ("random (= ease)", "popularity-among-cold", "meta-knn")
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert all(c["marec"]["l2"] in (10.0, 100.0) for c in on_disk["chosen"]) and len(on_disk["chosen"]) == 2
    assert "Cold items only" in (tmp_path / "out" / "results.md").read_text()


def test_cli_runs_the_protocol_and_refuses_a_set_without_items(toy: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["experiment", "--protocol", "cold-start", "--dataset", "toy", "--data-dir", str(toy), "--seeds", "1",
               "--out", str(tmp_path / "cli"), "--delta-grid", "10", "--l2-grid", "10", "--ab-grid", "0,1",
               "--blocks", "tags", "--first-order"])
    assert rc == 0 and "marec" in capsys.readouterr().out
    assert json.loads((tmp_path / "cli" / "results.json").read_text())["blocks"] == {"tags": N_GENRES}
    (toy / "bare").mkdir(exist_ok=True)
    pd.DataFrame({"user_id": [0, 1], "item_id": [0, 1]}).to_parquet(toy / "bare" / "interactions.parquet")
    with pytest.raises(DataError, match=r"no items\.parquet"):
        ColdStartJob(dataset="bare", data_dir=toy, out=tmp_path / "x").run()


def test_marec_vae_learns_cold_columns_its_backbone_cannot(toy: Path, tmp_path: Path) -> None:
    """The Multi-VAE backbone never sees a click on a cold item; with MARec's alignment target it ranks them."""
    job = ColdStartJob(dataset="toy", data_dir=toy, out=tmp_path / "vae", seeds=1, delta_grid=(50.0,),
                       l2_grid=(100.0,), ab_grid=(0.0, 1.0), knn_grid=(20,), vae_epochs=40, align_grid=(0.1, 1.0),
                       device="cpu")
    res = job.run().results
    cold = res["cold"]
    backbone, aligned = cold["multivae (no alignment)"], cold["marec-vae"]
    assert aligned["ndcg@10"]["mean"] > 1.5 * backbone["ndcg@10"]["mean"]
    assert aligned["ndcg@10"]["mean"] > cold["random (= ease)"]["ndcg@10"]["mean"]
    chosen = res["chosen"][0]
    assert chosen["marec-vae"]["ab"] in (0.1, 1.0)
    assert {"catalogue: marec-vae", "catalogue: marec-vae (warm guard)"} <= set(chosen)
    assert {"multivae", "marec-vae", "marec-vae (warm guard)"} <= set(res["catalogue"])
    # the backbone's cold columns never enter its top 25 of the whole catalogue
    assert res["catalogue"]["multivae"]["cold"]["recall@25"]["mean"] == 0.0
    assert res["gain_vae"]["ndcg@25"]["best_baseline"] in ("random (= ease)", "popularity-among-cold", "meta-knn",
                                                          "multivae (no alignment)")
    assert "Gain of MARec-VAE" in (tmp_path / "vae" / "results.md").read_text()
    tuned = {t["model"]: t["rows"] for t in res["tuning"]}
    assert [r["ab"] for r in tuned["marec-vae"]] == [0.1, 1.0]
    assert [r["ab"] for r in tuned["catalogue: marec-vae"]] == [0.0, 0.1, 1.0]


def test_grids_without_a_positive_value_are_refused(toy: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="align_grid needs at least one"):
        ColdStartJob(dataset="toy", data_dir=toy, out=tmp_path / "x", vae_epochs=5, align_grid=(0.0,))
    with pytest.raises(ValueError, match="ab_grid needs values >= 0 with at least one > 0"):
        ColdStartJob(dataset="toy", data_dir=toy, out=tmp_path / "x", ab_grid=(0.0,))
    assert not (tmp_path / "x").exists()


def test_the_text_ablation_runs_on_sentence_embeddings(toy: Path, tmp_path: Path) -> None:
    job = ColdStartJob(dataset="toy", data_dir=toy, out=tmp_path / "emb", seeds=1, delta_grid=(1.0,), l2_grid=(10.0,),
                       ab_grid=(0.0, 1.0), knn_grid=(20,), text_encoder="wordllama")
    res = job.run().results
    assert res["blocks"] == {"tags": N_GENRES, "plot:wordllama": 256}
    assert {"marec (no text)", "marec (with text)"} <= set(res["cold"])
    assert res["chosen"][0]["marec (with text)"]["blocks"] == "all"


@pytest.mark.parametrize("head", ["eq5", "ease"])
def test_the_cold_head_tuning_evidence_runs_on_the_protocols_split(toy: Path, capsys: pytest.CaptureFixture,
                                                                   head: str) -> None:
    """bench.cold_head_tuning (docs/results.md's "the weekly job's cold head, tuned"): one JSON line per seed with
    the choice, every pair tried, and both heads' metrics on the split's real cold-test titles."""
    from bench.cold_head_tuning import main as tuning_main

    tuning_main(["--dataset", "toy", "--data-dir", str(toy), "--seeds", "2", *(["--ease-l2", "10"] if head == "ease" else [])])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["seed"] for r in lines] == [0, 1] and {r["head"] for r in lines} == {head}
    for r in lines:
        assert len(r["grid"]) == 12 and "held out" in r["tuned"]
        best = max(r["grid"], key=lambda g: g["ndcg"])
        assert f"delta={best['delta']:g} neighbours={best['neighbours']}" in r["tuned"]
        for part in ("fixed_test", "tuned_test"):
            assert 0.0 < r[part]["ndcg@25"] <= 1.0 and r[part]["users"] > 0
