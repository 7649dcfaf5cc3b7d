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


# -- the ablation gate: a PIA model against its no-PIA twin -------------------------------------------------------

TWIN_TAGS = {"model": "multivae-pia", "compare.multivae.test.ndcg_at_100": "0.36",
             "compare.multivae.test.recall_at_20": "0.31", "test.ndcg_at_100": "0.35"}


def test_ablation_reads_the_twin_from_version_tags() -> None:
    from pipeline.training.gates import ablation_of

    ab = ablation_of("multivae-pia", TWIN_TAGS, users=60)
    assert ab.twin == "multivae" and ab.twin_metrics == {"ndcg@100": 0.36, "recall@20": 0.31} and ab.users == 60
    assert ablation_of("ease", TWIN_TAGS, 60).twin_metrics is None  # no PIA: nothing to compare
    assert "compare_base: false" in ablation_of("recvae-pia", TWIN_TAGS, 60).note  # PIA, but no recvae twin tagged


@pytest.mark.parametrize(("twin_ndcg", "tol", "blocks", "want"), [
    (0.35, 0.02, False, "pass"),     # equal
    (0.357, 0.02, False, "pass"),    # 0.35 >= 0.357 * 0.98 = 0.34986
    (0.36, 0.02, False, "warn"),     # 0.35 < 0.3528: PIA hurt, warn-only by default
    (0.36, 0.02, True, "fail"),      # ... and blocking when configured
    (0.36, 0.05, True, "pass"),      # within a wider tolerance
])
def test_ablation_pass_warn_fail(twin_ndcg: float, tol: float, blocks: bool, want: str) -> None:
    from pipeline.training.gates import Ablation

    ab = Ablation(model="multivae-pia", twin="multivae", twin_metrics={"ndcg@100": twin_ndcg}, users=60)
    cfg = GateConfig(ablation_tolerance=tol, ablation_blocks=blocks)
    res = check(cfg, CAND, None, BASE, 0, 0, ablation=ab)
    v = next(r for r in res if r.gate == "ablation.pia")
    assert v.status == want and passed(res) == (want != "fail")
    assert "60 test users" in v.detail
    if want != "pass":  # the detail names both numbers and says PIA hurt
        assert v.detail.startswith("PIA hurt this week") and "0.3500" in v.detail and f"{twin_ndcg:.4f}" in v.detail


def test_ablation_can_fail_alone_and_is_skipped_without_a_twin() -> None:
    from pipeline.training.gates import Ablation

    bad = Ablation(model="multivae-pia", twin="multivae", twin_metrics={"ndcg@100": 0.5}, users=60)
    res = check(GateConfig(ablation_blocks=True), CAND, None, BASE, 0, 0, ablation=bad)
    assert [r.gate for r in res if r.status == "fail"] == ["ablation.pia"]
    none = Ablation(model="multivae-pia", twin="multivae", note="no no-PIA twin (multivae) was trained")
    res = check(GateConfig(ablation_blocks=True), CAND, None, BASE, 0, 0, ablation=none)
    assert status(res, "ablation.pia") == "skipped" and passed(res)
    assert "ablation.pia" not in {r.gate for r in check(GateConfig(), CAND, None, BASE, 0, 0)}  # not asked: no verdict
    with pytest.raises(ValueError):
        GateConfig(ablation_tolerance=-0.1)
