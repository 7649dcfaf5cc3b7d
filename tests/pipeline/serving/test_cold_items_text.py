"""New titles ranked by their plots at serving (issue 29): an EASE bundle whose cold head embeds the free-text
column with the sentence encoder inside the wordllama wheel ("plot:wordllama"), saved and loaded back like the
registry's, scores the day's new titles from the items file's plots; what the daily job publishes is exactly the
head's own MARec score for every user it reaches."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
from infer_support import N_ITEMS, events_table, item_ids, run_infer, write_events

from model.cold_head import ColdHeadConfig, build_cold_head
from model.ease import EASEConfig
from model.recommenders import make_recommender
from pipeline.io.bundle import ModelBundle
from pipeline.io.items import items_uri
from pipeline.serving.job import InferJob
from pipeline.serving.recs import read_recommendations

DAY = dt.date(2024, 5, 3)
TOP_N = 8
NEW_CRIME, NEW_NO_PLOT = 5000, 5001
PLOTS = {
    0: ["A detective hunts a serial killer through the rainy city.", "Police investigate a brutal murder downtown."],
    1: ["Astronauts travel to a distant planet to save humanity.", "A starship crew fights aliens in deep space."],
    2: ["Two strangers fall in love during a summer in Paris.", "A shy writer and a florist fall for each other."],
    3: ["A family cooks a huge holiday dinner for the whole town.", "A chef opens a small restaurant by the sea."],
}


def plot(c: int) -> str:
    return PLOTS[c % 4][(c // 4) % 2]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> ModelBundle:
    """Users click within one plot topic, so MARec's block weight and the EASE weights have structure to find."""
    rng = np.random.default_rng(0)
    x = sp.csr_matrix(np.asarray([[float(c % 4 == u % 4 and rng.random() < 0.7) for c in range(N_ITEMS)]
                                  for u in range(160)], np.float32))
    rec = make_recommender("ease", ease=EASEConfig(l2=5.0)).fit(x)
    head = build_cold_head(rec, x, {"plot": [plot(c) for c in range(N_ITEMS)]},
                           ColdHeadConfig(blocks=("plot:wordllama",), delta=0.1, ab=50.0))
    b = ModelBundle(rec, item_ids(), np.asarray(x.sum(0)).ravel().astype(np.float32), "ease", {}, "snap", head)
    return ModelBundle.load(b.save(tmp_path_factory.mktemp("bundle") / "b"), "cpu")


def test_a_new_title_is_scored_from_its_plot(tmp_path: Path, bundle: ModelBundle) -> None:
    head = bundle.cold_head
    assert head is not None and [b.name for b in head.blocks] == ["plot:wordllama"]
    # clicks on the crime titles (columns 0, 4, 8, ...) for half the users, on the others' topics for the rest
    table = events_table(n_users=60)
    uri = write_events(table, str(tmp_path / "events"))
    new_plot = "A police detective tracks a murderer through the city at night."
    folder = Path(items_uri(str(tmp_path), DAY))
    folder.mkdir(parents=True)
    rows = [(1000 + c, plot(c)) for c in range(N_ITEMS)] + [(NEW_CRIME, new_plot), (NEW_NO_PLOT, None)]
    pq.write_table(pa.table({"item_id": pa.array([r[0] for r in rows], pa.int64()),
                             "title": pa.array([f"t{r[0]}" for r in rows]),
                             "tags": pa.array([["film"]] * len(rows), pa.list_(pa.string())),
                             "plot": pa.array([r[1] for r in rows], pa.string())}), folder / "items.parquet")
    job = InferJob(date=DAY, events=uri, out=str(tmp_path), device="cpu", progress=False, shard_events=100,
                   top_n=TOP_N, precision="fp32", cold_slots=2)
    m = run_infer(job, bundle, "1")
    assert (m["cold_items_new"], m["cold_items_scored"], m["cold_head"]) == (2, 2, "marec")
    out = {r["user_id"]: r for r in read_recommendations(str(tmp_path), DAY).to_pylist()}
    w = bundle.recommender.weights  # type: ignore[attr-defined]
    c = head.cold_columns(head.encode({"plot": [new_plot, None]}, 2), w)
    assert c[:, 0][0::4].mean() > c[:, 0][1::4].mean()  # the crime plot's column leans on the crime titles
    assert not c[:, 1].any()  # no plot: no score
    reached = set()
    for u, row in out.items():
        hist = [it - 1000 for it in table.filter(pa.compute.equal(table["user_id"], u))["item_id"].to_pylist()
                if 1000 <= it < 1000 + N_ITEMS]
        x = sp.csr_matrix((np.ones(len(set(hist)), np.float32), (np.zeros(len(set(hist)), int), sorted(set(hist)))),
                          shape=(1, N_ITEMS))
        _, warm = bundle.recommend(x, TOP_N)
        cold = float((x @ c[:, 0])[0])
        if hist and cold > 0 and cold > warm[0, -1]:
            reached.add(u)
            assert row["scores"][row["item_ids"].index(NEW_CRIME)] == pytest.approx(cold, rel=1e-4)
        assert NEW_NO_PLOT not in row["item_ids"]
    assert {u for u, r in out.items() if NEW_CRIME in r["item_ids"]} == reached and reached
