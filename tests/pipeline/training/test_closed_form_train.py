"""TrainJob with a closed-form main model (EASE; EDLAE when model.recommenders has it): l2 chosen on validation
users, registered as the same pyfunc bundle, gated, served by `recsys infer`; the dense memory budget refuses a
catalog before anything is trained or registered."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from infer_support import events_table, write_events

from pipeline.errors import DataError
from pipeline.io import registry
from pipeline.training.train_job import TrainJob, dense_bytes, trainable

from .conftest import NAME, aliases, gate, tiny


def test_ease_main_model_tunes_registers_reloads_gates_and_serves(home: Path, synth_snapshot: str, easy_gates,
                                                                  tmp_path: Path) -> None:
    from model.recommenders import EASE
    from pipeline.cli.main import main
    from pipeline.serving.recs import read_recommendations

    r = tiny(synth_snapshot, model="ease", l2_grid=(5.0, 50.0, 5000.0)).run()
    c = registry.client()
    run = c.get_run(r.run_id)
    tuned = c.get_metric_history(r.run_id, "tune.val_ndcg_at_100")
    assert [m.step for m in tuned] == [0, 1, 2]  # one solve per l2, scored on validation users
    best = max(range(3), key=lambda i: tuned[i].value)
    chosen = (5.0, 50.0, 5000.0)[best]
    assert float(run.data.params["chosen.l2"]) == chosen == r.metrics["chosen.l2"]
    assert not any(k.startswith("compare.") for k in run.data.metrics)  # no twin for a closed-form model
    assert not c.list_artifacts(r.run_id, "plots")  # no training curves or latents to plot
    v = c.get_model_version(NAME, r.version)
    assert v.tags["model"] == "ease" and float(v.tags["chosen.l2"]) == chosen
    # the model is its own EASE baseline (not solved a second time with the default l2)
    assert v.tags["baseline.ease.ndcg_at_100"] == v.tags["test.ndcg_at_100"]

    bundle, _ = registry.load_bundle(f"models:/{NAME}/{r.version}")
    assert isinstance(bundle.recommender, EASE) and bundle.recommender.config.l2 == chosen
    assert bundle.recommender.weights.shape == (150, 150) and bundle.name == "ease"

    g = gate(r.version, gates=easy_gates)
    assert g.promoted and aliases()["champion"] == r.version
    assert g.metrics[f"candidate v{r.version}"]["ndcg@100"] == pytest.approx(r.metrics["test.ndcg_at_100"], abs=1e-5)
    abl = next(x for x in g.verdicts if x.gate == "ablation.pia")
    assert abl.status == "skipped" and "has no PIA" in abl.detail

    events = write_events(events_table(n_users=30), str(tmp_path / "events"))
    lake = tmp_path / "lake"
    assert main(["infer", "--date", "2024-05-03", "--events", events, "--out", str(lake), "--model",
                 f"models:/{NAME}@champion", "--device", "cpu", "--top-n", "5", "--no-progress"]) == 0
    recs = read_recommendations(str(lake), "latest")
    assert recs.num_rows > 0 and set(recs["model_version"].to_pylist()) == {r.version}
    assert (lake / "recommendations" / f"dt={dt.date(2024, 5, 3).isoformat()}").is_dir()


def test_ease_over_the_memory_budget_is_refused_before_training(home: Path, synth_snapshot: str) -> None:
    need = dense_bytes(150)  # the synthetic catalog: 150 items, float32
    assert need == 150 * 150 * 4 and dense_bytes(150, "float64", "cuda") == 4 * need
    with pytest.raises(DataError, match=r"ease over 150 items needs .* over max_dense_bytes=1000.*nothing was trained"):
        tiny(synth_snapshot, model="ease", max_dense_bytes=1000).run()
    c = registry.client()
    assert c.search_registered_models() == []  # nothing registered
    assert all(not c.search_runs([e.experiment_id]) for e in c.search_experiments())  # not even a run opened
    tiny(synth_snapshot, model="multivae", max_dense_bytes=1000).check_budget(150)  # closed-form main models only


def test_closed_form_job_validation() -> None:
    job = TrainJob(snapshot="s", model="ease", l2_grid=(10.0, 10.0, 20.0))
    assert job.closed_form and job.base_model is None and job.l2_grid == (10.0, 20.0)
    assert job.max_dense_bytes > 0
    with pytest.raises(ValueError, match="l2_grid"):
        TrainJob(snapshot="s", model="ease", l2_grid=(0.0,))
    with pytest.raises(ValueError, match="unknown model"):
        TrainJob(snapshot="s", model="popularity")
    with pytest.raises(DataError, match="closed form"):
        TrainJob(snapshot="s", model="ease", distributed={"num_processes": 2}).run()
    if "edlae" in trainable():  # model.recommenders registers EDLAE: trained by name, same path
        assert TrainJob(snapshot="s", model="edlae").closed_form
