"""`recsys experiment` with EDLAE: its (l2, dropout) pairs searched on validation users like EASE's l2, the chosen
pair reused for later seeds, a stopped search resumed from the checkpoint (where a pair is a JSON list)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pydantic
import pytest

import pipeline.research.experiment as exp_mod
from model.ease import EDLAEConfig
from pipeline.research.experiment import ExperimentJob

GRID = ((200.0, 0.0), (10.0, 0.5))


def small(out: Path, **kw: Any) -> ExperimentJob:
    base = dict(dataset="synthetic", models=("edlae",), seeds=1, out=out, device="cpu", synthetic_users=400,
                synthetic_items=150, edlae_grid=GRID, progress=False)
    return ExperimentJob(**(base | kw))


def record_builds(monkeypatch: pytest.MonkeyPatch, stop_at: int | None = None) -> list[Any]:
    """The config of every model built; the `stop_at`-th build is interrupted (as a timeout would)."""
    real, built = exp_mod.make_recommender, []

    def build(name: str, **kw: Any) -> Any:
        built.append(kw.get("ease"))
        if stop_at is not None and len(built) == stop_at:
            raise KeyboardInterrupt
        return real(name, **kw)

    monkeypatch.setattr(exp_mod, "make_recommender", build)
    return built


def test_the_pairs_are_searched_on_validation_and_the_winner_reused(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    built = record_builds(monkeypatch)
    res = small(tmp_path, seeds=2).run().results
    rows = res["tuning"]["edlae"]
    assert [tuple(r["value"]) for r in rows] == list(GRID)
    best = max(rows, key=lambda r: r["val_ndcg@100"])
    assert res["chosen"]["edlae"] == best["value"] and rows[0]["val_ndcg@100"] != rows[1]["val_ndcg@100"]
    l2, p = best["value"]
    # two search fits on seed 0, then seed 1 at the chosen pair only
    assert built == [EDLAEConfig(l2=a, dropout=b) for a, b in GRID] + [EDLAEConfig(l2=l2, dropout=p)]
    assert [r["seed"] for r in res["per_seed"]["edlae"]] == [0, 1]
    md = (tmp_path / "results.md").read_text()
    assert f"| edlae | l2={l2:g}, p={p:g} **(chosen)** |" in md
    assert res["config"]["edlae_grid"] == [list(v) for v in GRID]


def test_resume_inside_the_search_keeps_its_finished_pair(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    whole = small(tmp_path / "whole").run().results
    record_builds(monkeypatch, stop_at=2)
    with pytest.raises(KeyboardInterrupt):
        small(tmp_path / "run", resume=True).run()
    ckpt = json.loads((tmp_path / "run" / "checkpoint.json").read_text())
    assert [r["value"] for r in ckpt["searching"]["edlae"]] == [list(GRID[0])]
    built = record_builds(monkeypatch)
    res = small(tmp_path / "run", resume=True).run().results
    assert built[0] == EDLAEConfig(l2=GRID[1][0], dropout=GRID[1][1])  # the restored first pair is not fit again
    assert res["tuning"] == whole["tuning"] and res["chosen"] == whole["chosen"]
    assert res["per_seed"]["edlae"][0]["ndcg@100"] == whole["per_seed"]["edlae"][0]["ndcg@100"]
    assert res["resumed"] == ["edlae value l2=200, p=0 (search, seed 0)"]


def test_a_checkpoint_with_the_default_grid_has_no_grid_in_its_fingerprint(tmp_path: Path) -> None:
    """Checkpoints written before edlae_grid existed resume: the default grid is left out of the fingerprint."""
    exp = exp_mod.Experiment(small(tmp_path, edlae_grid=exp_mod.DEFAULT_EDLAE_GRID, models=("popularity",)))
    data = exp_mod.load_experiment_data(exp.cfg)
    assert "edlae_grid" not in exp.fingerprint(data)["config"]
    assert "edlae_grid" in exp_mod.Experiment(small(tmp_path)).fingerprint(data)["config"]


def test_edlae_is_skipped_above_the_catalog_limit(tmp_path: Path) -> None:
    res = small(tmp_path, models=("popularity", "edlae"), max_ease_items=100).run().results
    assert "edlae" not in res["models"] and "max_ease_items=100" in res["skipped"]["edlae"]


@pytest.mark.parametrize("grid", [(), ((0.0, 0.2),), ((10.0, 1.0),), ((10.0, -0.1),), ((10.0,),)])
def test_a_bad_grid_is_refused(tmp_path: Path, grid: tuple) -> None:
    with pytest.raises(pydantic.ValidationError):
        small(tmp_path, edlae_grid=grid)


def test_the_cli_takes_the_grid_as_l2_colon_p_pairs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from pipeline.cli.main import main

    args = ["experiment", "--dataset", "synthetic", "--models", "edlae", "--seeds", "1", "--no-progress",
            "--synthetic-users", "400", "--synthetic-items", "150", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "ok"), "--edlae-grid", "200:0,10:0.5"]) == 0
    res = json.loads((tmp_path / "ok" / "results.json").read_text())
    assert [r["value"] for r in res["tuning"]["edlae"]] == [[200.0, 0.0], [10.0, 0.5]]
    with pytest.raises(SystemExit):
        main([*args, "--out", str(tmp_path / "bad"), "--edlae-grid", "200"])
    assert "not l2:dropout" in capsys.readouterr().err and not (tmp_path / "bad").exists()
