"""The serving memory budget (InferJob.max_model_mb, issue 28: EASE serving is dense I x I): a model whose weights
exceed it is refused from its description, before the weights are read, and nothing is published; one that fits
is scored as usual."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from infer_support import N_ITEMS, events_table, item_ids, write_events

from model.ease import EASEConfig
from model.recommenders import make_recommender
from pipeline.errors import DataError
from pipeline.io import bundle as bundle_module
from pipeline.io.bundle import ModelBundle
from pipeline.serving.job import InferJob
from pipeline.serving.recs import read_recommendations

DAY = dt.date(2024, 5, 3)


@pytest.fixture(scope="module")
def ease_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    x = sp.csr_matrix((np.random.default_rng(0).random((150, N_ITEMS)) < 0.2).astype(np.float32))
    rec = make_recommender("ease", ease=EASEConfig(l2=5.0)).fit(x)
    b = ModelBundle(rec, item_ids(), np.asarray(x.sum(0)).ravel().astype(np.float32), "ease", {}, "snap")
    return b.save(tmp_path_factory.mktemp("bundle") / "ease")


def job(events_uri: str, out: Path, model: Path, **kw: object) -> InferJob:
    return InferJob(**({"date": DAY, "events": events_uri, "out": str(out), "model": str(model), "device": "cpu",
                        "progress": False, "top_n": 5, "precision": "fp32"} | kw))


def test_weights_over_the_budget_are_refused_before_they_are_read(ease_folder: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    size = (ease_folder / "recommender.pt").stat().st_size

    def never(*_: object) -> None:
        raise AssertionError("the weights were read")

    with monkeypatch.context() as m:
        m.setattr(bundle_module, "_load_state", never)
        with pytest.raises(DataError) as e:
            ModelBundle.load(ease_folder, "cpu", max_bytes=size - 1)
    assert "over the serving memory budget" in e.value.problem and f"{N_ITEMS} items" in e.value.problem
    assert "--max-model-mb" in e.value.fix
    assert ModelBundle.load(ease_folder, "cpu", max_bytes=size).n_items == N_ITEMS  # exactly at the budget: fine


def test_the_daily_job_refuses_an_over_budget_model_and_publishes_nothing(tmp_path: Path, ease_folder: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """max_model_mb unset: the default budget (a quarter of the machine's memory), shrunk here below the model."""
    import pipeline.serving.job as job_module

    events = write_events(events_table(n_users=40), str(tmp_path / "events"))
    out = tmp_path / "lake"
    with monkeypatch.context() as m:
        m.setattr(job_module, "default_dense_bytes", lambda: 1024)
        with pytest.raises(DataError, match="over the serving memory budget"):
            job(events, out, ease_folder).run()
    assert not (out / "recommendations").exists()  # nothing published
    r = job(events, out, ease_folder, max_model_mb=64).run()  # an explicit budget that holds it
    assert r.users > 0 and read_recommendations(str(out), DAY).num_rows == r.users
