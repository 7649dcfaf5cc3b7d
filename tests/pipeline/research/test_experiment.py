"""The evaluation harness end to end on small data: files, tables, tuning on validation only, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli.main import main
from pipeline.research.experiment import ExperimentJob
from pipeline.training.evaluation import activity_groups

FAST = ["--epochs", "3", "--patience", "2", "--no-progress", "--synthetic-users", "400", "--synthetic-items", "150"]


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("exp")
    rc = main(["experiment", "--dataset", "synthetic", "--models", "popularity,ease,multivae,multivae-pia",
               "--seeds", "2", "--out", str(out), "--pia-grid", "0.01,0.5", "--ease-grid", "10,200",
               "--device", "cpu", *FAST])
    assert rc == 0
    return out, json.loads((out / "results.json").read_text())


def test_results_files_and_aggregates(synthetic_run: tuple[Path, dict]) -> None:
    out, res = synthetic_run
    md = (out / "results.md").read_text()
    assert set(res["models"]) == {"popularity", "ease", "multivae", "multivae-pia"}
    assert res["seeds"] == [0, 1]
    for name, agg in res["models"].items():
        rows = res["per_seed"][name]
        assert [r["seed"] for r in rows] == [0, 1]
        vals = [r["ndcg@100"] for r in rows]
        assert agg["ndcg@100"]["mean"] == pytest.approx(np.mean(vals))
        assert agg["ndcg@100"]["std"] == pytest.approx(np.std(vals, ddof=1))
        assert 0.0 < agg["ndcg@100"]["mean"] <= 1.0
        assert f"| {name} |" in md
    # collaborative models beat popularity on clustered synthetic data
    assert res["models"]["ease"]["ndcg@100"]["mean"] > res["models"]["popularity"]["ndcg@100"]["mean"]
    assert "[5-10]" in md and "PIA uplift" in md


def test_pia_uplift_is_per_seed_difference(synthetic_run: tuple[Path, dict]) -> None:
    _, res = synthetic_run
    up = res["pia_uplift"]["multivae-pia"]
    base = {r["seed"]: r["ndcg@100"] for r in res["per_seed"]["multivae"]}
    pia = {r["seed"]: r["ndcg@100"] for r in res["per_seed"]["multivae-pia"]}
    assert up["diffs"]["ndcg@100"] == pytest.approx([pia[s] - base[s] for s in (0, 1)])


def test_hyperparameters_chosen_on_validation(synthetic_run: tuple[Path, dict]) -> None:
    _, res = synthetic_run
    for name in ("ease", "multivae-pia"):
        table = res["tuning"][name]
        best = max(table, key=lambda r: r["val_ndcg@100"])
        assert res["chosen"][name] == best["value"]
        assert {r["value"] for r in table} == ({10.0, 200.0} if name == "ease" else {0.01, 0.5})


def test_activity_groups_partition() -> None:
    counts = np.array([5, 10, 11, 50, 51, 100, 101, 5000])
    groups = activity_groups(counts)
    assert [int(m.sum()) for m in groups.values()] == [2, 2, 2, 2]
    assert np.all(sum(m.astype(int) for m in groups.values()) == 1)


def test_unknown_dataset_is_clear_error_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "o"
    rc = main(["experiment", "--dataset", "no-such-set", "--data-dir", str(tmp_path), "--out", str(out), *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and "no-such-set" in err and "Fix" in err
    assert not out.exists()


def test_unknown_model_is_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["experiment", "--dataset", "synthetic", "--models", "multivae,bogus", "--out", str(tmp_path / "o")])
    assert rc == 2 and "bogus" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu_is_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["experiment", "--dataset", "synthetic", "--device", "cuda", "--out", str(tmp_path / "o"), *FAST])
    assert rc == 2 and "no CUDA device" in capsys.readouterr().err


def test_too_small_for_split(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import pandas as pd

    df = pd.DataFrame({"user_id": np.repeat([1, 2], 6), "item_id": np.tile(np.arange(6), 2)})
    path = tmp_path / "tiny.parquet"
    df.to_parquet(path)
    rc = main(["experiment", "--dataset", str(path), "--models", "popularity", "--out", str(tmp_path / "o"), *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and "users" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.data
def test_real_data_ml_latest_small(shared_data: Path, tmp_path: Path) -> None:
    cfg = ExperimentJob(dataset="ml-latest-small", data_dir=shared_data, models=("popularity", "ease"), seeds=1,
                           out=tmp_path, ease_grid=(250.0,), progress=False, device="cpu")
    res = cfg.run().results
    assert res["data"]["rule"]["min_rating"] == 4.0  # ratings binarized at >= 4 by default
    assert res["models"]["ease"]["recall@20"]["mean"] > res["models"]["popularity"]["recall@20"]["mean"]


def test_a_run_stopped_after_a_seed_keeps_that_seeds_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.research.experiment as exp_mod

    real = exp_mod.strong_generalization_split
    calls = []

    def split_then_stop(*args, **kwargs):  # the second seed's split is interrupted (as a timeout would)
        calls.append(kwargs["seed"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(exp_mod, "strong_generalization_split", split_then_stop)
    cfg = ExperimentJob(dataset="synthetic", models=("popularity",), seeds=3, out=tmp_path, device="cpu",
                           synthetic_users=400, synthetic_items=150, progress=False)
    with pytest.raises(KeyboardInterrupt):
        cfg.run()
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["seeds"] == [0] and res["seeds_planned"] == 3
    assert len(res["per_seed"]["popularity"]) == 1
    assert "Partial run:** 1 of 3 planned seeds" in (tmp_path / "results.md").read_text()
    assert not (tmp_path / "results.json.tmp").exists()


def test_one_seed_reports_no_spread(tmp_path: Path) -> None:
    from pipeline.research.report import render

    cfg = ExperimentJob(dataset="synthetic", models=("popularity", "multivae", "multivae-pia"), seeds=1,
                           out=tmp_path, device="cpu", synthetic_users=400, synthetic_items=150, epochs=2,
                           pia_grid=(0.1,), progress=False)
    res = cfg.run().results
    assert res["models"]["popularity"]["ndcg@100"]["std"] is None
    assert res["pia_uplift"]["multivae-pia"]["std"]["ndcg@100"] is None
    table = render(res)
    assert "±" not in table.split("NDCG@100 by user activity")[0]
    # the budget line names the epochs these models trained for; a RecVAE budget would be noise here
    assert "max epochs 2, early-stop patience" in table and "RecVAE" not in table.split("\n\n")[1]


def test_budget_line_names_only_what_ran() -> None:
    from pipeline.research.report import _budget

    cfg = {"epochs": 30, "recvae_epochs": None, "patience": 10}
    assert _budget({**cfg, "models": ["ease"]}) == "closed-form models only (no epochs)"
    assert _budget({**cfg, "models": ["popularity", "multivae"]}) == "max epochs 30, early-stop patience 10"
    assert _budget({**cfg, "models": ["recvae-pia"], "recvae_epochs": 20}) == \
        "max epochs 30 (RecVAE 20), early-stop patience 10"
    assert _budget({**cfg, "models": ["recvae"], "epochs": 200}) == "max epochs 200 (RecVAE 50), early-stop patience 10"


def _small(tmp_path: Path, **kw) -> ExperimentJob:
    base = dict(dataset="synthetic", models=("popularity", "ease", "multivae"), seeds=1, out=tmp_path, device="cpu",
                synthetic_users=400, synthetic_items=150, epochs=2, patience=None, ease_grid=(10.0, 200.0),
                progress=False)
    return ExperimentJob(**(base | kw))


def _same(a: object, b: object) -> bool:  # equal, NaN included (an activity group without test users)
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _stop_at(monkeypatch: pytest.MonkeyPatch, model: str, nth: int = 1) -> list[str]:
    """Records every model built; the nth build of `model` is interrupted (as a timeout or a restart would)."""
    import pipeline.research.experiment as exp_mod

    real, built = exp_mod.make_recommender, []

    def build(name: str, **kw):
        built.append(name)
        if name == model and built.count(model) == nth:
            raise KeyboardInterrupt
        return real(name, **kw)

    monkeypatch.setattr(exp_mod, "make_recommender", build)
    return built


def test_resume_reuses_finished_fits_and_runs_the_rest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built = _stop_at(monkeypatch, "multivae")
    with pytest.raises(KeyboardInterrupt):  # stopped inside seed 0: results.json has no seed yet, the checkpoint has two fits
        _small(tmp_path, resume=True).run()  # --resume with no checkpoint yet runs every fit
    assert built == ["popularity", "ease", "ease", "multivae"] and not (tmp_path / "results.json").exists()
    ckpt = json.loads((tmp_path / "checkpoint.json").read_text())
    assert set(ckpt["per_seed"]) == {"popularity", "ease"} and ckpt["chosen"]["ease"] in (10.0, 200.0)

    built = _stop_at(monkeypatch, "none")
    res = _small(tmp_path, resume=True).run().results
    assert built == ["multivae"]  # neither popularity nor EASE's two-value search ran again
    assert res["resumed"] == ["popularity seed 0", "ease seed 0"]
    assert _same(res["per_seed"]["ease"], ckpt["per_seed"]["ease"])  # the same fit, its measured fit time included
    assert res["chosen"]["ease"] == ckpt["chosen"]["ease"] and res["tuning"]["ease"] == ckpt["tuning"]["ease"]
    assert res["seeds"] == [0] and res["models"]["multivae"]["ndcg@100"]["mean"] > 0
    assert res["wall_seconds"] >= ckpt["wall_seconds"]
    assert "**Resumed:** 2 fit(s) restored" in (tmp_path / "results.md").read_text()
    assert "resume" not in res["config"]  # how the run was started is not part of what it measured


@pytest.mark.parametrize("grid", [(10.0, 200.0), (200.0, 10.0)])  # 200 wins: the second value, then the restored one
def test_resume_inside_a_search_keeps_its_finished_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          grid: tuple[float, float]) -> None:
    kw = {"models": ("ease",), "ease_grid": grid}
    whole = _small(tmp_path / "whole", **kw).run().results  # the same run, never stopped
    assert whole["chosen"]["ease"] == 200.0
    built = _stop_at(monkeypatch, "ease", nth=2)  # stopped while fitting the grid's second value
    with pytest.raises(KeyboardInterrupt):
        _small(tmp_path / "run", resume=True, **kw).run()
    ckpt = json.loads((tmp_path / "run" / "checkpoint.json").read_text())
    assert ckpt["per_seed"] == {} and [r["value"] for r in ckpt["searching"]["ease"]] == [grid[0]]

    built = _stop_at(monkeypatch, "none")
    res = _small(tmp_path / "run", resume=True, **kw).run().results
    # the first value is not fit again, unless it won: then once more for the test scoring
    assert built == (["ease"] if grid[1] == 200.0 else ["ease", "ease"])
    assert res["resumed"] == [f"ease value {grid[0]:g} (search, seed 0)"]
    assert res["tuning"] == whole["tuning"] and res["chosen"] == whole["chosen"]
    assert _same({m: res["per_seed"]["ease"][0][m] for m in ("ndcg@100", "recall@20", "groups")},
                 {m: whole["per_seed"]["ease"][0][m] for m in ("ndcg@100", "recall@20", "groups")})
    assert json.loads((tmp_path / "run" / "checkpoint.json").read_text())["searching"] == {}


def test_resume_adds_seeds_to_a_finished_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = _small(tmp_path, models=("popularity", "ease")).run().results
    built = _stop_at(monkeypatch, "none")
    res = _small(tmp_path, models=("popularity", "ease"), seeds=2, resume=True).run().results
    assert built == ["popularity", "ease"]  # seed 1 only, EASE at seed 0's chosen l2 (no second search)
    assert res["seeds"] == [0, 1] and _same(res["per_seed"]["ease"][0], first["per_seed"]["ease"][0])
    assert res["models"]["ease"]["ndcg@100"]["std"] is not None


def test_a_run_without_resume_starts_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _small(tmp_path, models=("popularity",)).run()
    built = _stop_at(monkeypatch, "none")
    res = _small(tmp_path, models=("popularity",)).run().results
    assert built == ["popularity"] and res["resumed"] == []


def test_resume_with_other_options_is_refused_and_changes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "o"
    args = ["experiment", "--dataset", "synthetic", "--models", "popularity", "--seeds", "1", "--out", str(out),
            "--device", "cpu", *FAST]
    assert main(args) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    rc = main([*args, "--epochs", "5", "--resume"])  # FAST's --epochs 3 became 5
    err = capsys.readouterr().err
    assert rc == 2 and "epochs: 3 then, 5 now" in err and "start over" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("text", ["{not json", '{"version": 1}', '{"version": 1, "per_seed": {}, "tuning": {"ease": []},'
                                  ' "chosen": {}, "wall_seconds": 1}', "[]"])
def test_resume_from_an_unusable_checkpoint_is_a_clear_error(tmp_path: Path, text: str,
                                                             capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "checkpoint.json").write_text(text)
    rc = main(["experiment", "--dataset", "synthetic", "--models", "popularity", "--out", str(tmp_path),
               "--device", "cpu", "--resume", *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot use" in err and "checkpoint.json" in err and "to start over" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.json"]
    assert (tmp_path / "checkpoint.json").read_text() == text


def test_recvae_gets_the_autoencoders_budget_unless_told(tmp_path: Path) -> None:
    """RecVAE's paper's 50 epochs bound on ml-1m and anime: not given, its cap is `epochs`, recorded as a number
    (a results file that says None keeps its old meaning, min(epochs, 50), in the budget line)."""
    from pipeline.research.report import _budget

    assert _small(tmp_path, epochs=120).recvae_epochs == 120
    assert _small(tmp_path, epochs=120, recvae_epochs=40).recvae_epochs == 40
    assert ExperimentJob(dataset="synthetic", out=tmp_path).recvae_epochs == 200  # the default epochs
    job = _small(tmp_path, epochs=120, models=("recvae",))
    assert _budget(job.model_dump(mode="json")) == "max epochs 120 (RecVAE 120), early-stop patience None"
