"""pipeline.training.gates: each gate on its own (pure), and the defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import DataError
from pipeline.training.gates import GateConfig, check, load_gate_config, passed

CAND = {"recall@20": 0.30, "recall@50": 0.40, "ndcg@100": 0.35, "coverage@20": 0.5}
BASE = {"popularity": {"ndcg@100": 0.2}, "ease": {"ndcg@100": 0.37}}


def status(results, gate: str) -> str:
    return next(r.status for r in results if r.gate == gate)


def test_first_model_skips_champion_gates_only() -> None:
    res = check(GateConfig(), CAND, None, BASE, 0, 0)
    assert passed(res)
    assert {r.detail for r in res if r.gate.startswith("champion.")} == {"no champion: skipped"}
    assert all(r.status == "pass" for r in res if not r.gate.startswith("champion."))


@pytest.mark.parametrize(("cfg", "champ", "nan", "seen", "gate"), [
    (GateConfig(floors={"ndcg@100": 0.9}), None, 0, 0, "floor.ndcg@100"),
    (GateConfig(), {**CAND, "recall@50": 0.5}, 0, 0, "champion.recall@50"),
    (GateConfig(popularity_margin=1.0), None, 0, 0, "baseline.popularity"),
    (GateConfig(ease_margin=0.0), None, 0, 0, "baseline.ease"),
    (GateConfig(coverage_floor=1.0), None, 0, 0, "coverage"),
    (GateConfig(), None, 3, 0, "sanity.nan"),
    (GateConfig(), None, 0, 1, "sanity.seen"),
])
def test_each_gate_can_fail_alone(cfg, champ, nan, seen, gate) -> None:
    res = check(cfg, CAND, champ, BASE, nan, seen)
    assert not passed(res)
    assert [r.gate for r in res if r.status == "fail"] == [gate]


def test_nan_metric_fails_and_missing_ease_is_skipped() -> None:
    res = check(GateConfig(), {**CAND, "ndcg@100": float("nan")}, None, {"popularity": {"ndcg@100": 0.1}}, 0, 0)
    assert status(res, "floor.ndcg@100") == "fail" and status(res, "baseline.ease") == "skipped"


def test_yaml_config(tmp_path: Path) -> None:
    f = tmp_path / "g.yaml"
    f.write_text("floors: {ndcg@100: 0.2, recall@20: 0.1}\ncoverage_floor: 0.3\n")
    cfg = load_gate_config(f)
    assert cfg.floors == {"ndcg@100": 0.2, "recall@20": 0.1} and cfg.coverage_floor == 0.3
    with pytest.raises(DataError):
        load_gate_config(tmp_path / "missing.yaml")
    with pytest.raises(ValueError):
        GateConfig(coverage_floor=2.0)


def test_no_baselines_fail_closed_unless_allowed() -> None:
    res = check(GateConfig(), CAND, None, {}, 0, 0)
    assert [r.gate for r in res if r.status == "fail"] == ["baseline.popularity", "baseline.ease"]
    assert all("baselines were not computed at training (baselines: false); failing closed" in r.detail
               for r in res if r.gate.startswith("baseline."))
    res = check(GateConfig(allow_missing_baselines=True), CAND, None, {}, 0, 0)
    assert passed(res) and {r.status for r in res if r.gate.startswith("baseline.")} == {"skipped"}
    assert "allowed by allow_missing_baselines" in next(r.detail for r in res if r.gate == "baseline.ease")
    # popularity but no EASE: training skipped EASE for the catalog size, not a missing-baselines config
    res = check(GateConfig(), CAND, None, {"popularity": BASE["popularity"]}, 0, 0)
    assert passed(res) and "max_ease_items" in next(r.detail for r in res if r.gate == "baseline.ease")
