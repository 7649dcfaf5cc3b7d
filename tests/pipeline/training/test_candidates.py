"""CandidatesJob (`recsys train-candidates`): candidates of several families on one snapshot, gated on the same test
users; the best one that passes every gate becomes champion, a better one that fails a gate does not; bad input
(an EASE candidate over the memory budget, a shared key set per candidate) is refused before anything trains."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from pipeline.errors import DataError
from pipeline.io import registry
from pipeline.training.candidates import GROUP_TAG, CandidatesJob, load_candidates
from pipeline.training.gates import GateConfig

from .conftest import NAME, aliases, events

REPO = Path(__file__).resolve().parents[3]
COMMON = {"epochs": 5, "lr": 3e-3, "batch_size": 100, "device": "cpu", "patience": None,
          "vae": {"hidden_dims": [32], "latent_dim": 8, "anneal_steps": 100}}


@pytest.mark.slow  # three trainings and four gate runs: about a minute on 2 cores
def test_best_passing_candidate_is_promoted_and_a_better_failing_one_is_not(home: Path, synth_snapshot: str) -> None:
    # The latent gate fails closed for a version without latent diagnostics: EASE (the best on this data) fails it,
    # so the promoted one must be the better of the two autoencoders that pass.
    gates = GateConfig(floors={"ndcg@100": 0.05}, popularity_margin=-0.5, ease_margin=0.9, coverage_floor=0.05,
                       latent_floors={"active_units": 0})
    job = CandidatesJob(snapshot=synth_snapshot, registered_name=NAME, gates=gates, group="wk-1", common=COMMON,
                        candidates=({"model": "multivae-pia", "compare_base": True},
                                    {"model": "multivae", "epochs": 2, "seed": 1},
                                    {"model": "ease", "l2_grid": [50.0]}))
    r = job.run()
    by_model = {o.model: o for o in r.candidates}
    assert [o.model for o in r.candidates] == ["multivae-pia", "multivae", "ease"] and r.group == "wk-1"
    ease, vaes = by_model["ease"], [by_model["multivae-pia"], by_model["multivae"]]
    assert not ease.passed and [v.gate for v in ease.verdicts if v.status == "fail"] == ["latent.active_units"]
    assert all(o.passed for o in vaes)
    best = max(vaes, key=lambda o: o.primary)
    assert ease.primary > best.primary  # the failing candidate really is the better one by the primary metric
    assert r.promoted == best.version == r.champion == aliases()["champion"]
    assert [o.promoted for o in r.candidates].count(True) == 1
    loser = next(o for o in vaes if o is not best)
    assert loser.held is not None and f"candidate v{best.version}" in loser.held and ease.held is None

    c = registry.client()
    tags = {o.version: c.get_model_version(NAME, o.version).tags for o in r.candidates}
    assert {t[GROUP_TAG] for t in tags.values()} == {"wk-1"}  # one group, same registered model
    assert {t["candidates.index"] for t in tags.values()} == {"0", "1", "2"}
    assert tags[loser.version]["gate.verdict"] == "passed" and "gate.held" in tags[loser.version]
    assert tags[ease.version]["gate.verdict"] == "failed"
    assert sorted(events()) == ["promotion", "rejection", "rejection"]  # one ledger line per candidate
    pia = by_model["multivae-pia"]  # trained with its twin: the ablation gate ran (pass or warn, never blocking)
    assert next(v for v in pia.verdicts if v.gate == "ablation.pia").status in ("pass", "warn")

    html = Path((best.html_report or "").removeprefix("file:")).read_text()  # the winner's report lists every candidate
    cands = html.split("<h2>Candidates</h2>", 1)[1].split("<h2>", 1)[0]
    for o in r.candidates:
        assert f"v{o.version}" in cands and o.model in cands
    assert "Ablation: PIA against its no-PIA twin" in html


def test_over_budget_candidate_refuses_the_whole_group_before_training(home: Path, synth_snapshot: str) -> None:
    job = CandidatesJob(snapshot=synth_snapshot, registered_name=NAME, common=COMMON,
                        candidates=({"model": "multivae-pia"}, {"model": "ease", "max_dense_bytes": 1000}))
    with pytest.raises(DataError, match="max_dense_bytes=1000"):
        job.run()
    c = registry.client()
    assert c.search_registered_models() == []
    assert all(not c.search_runs([e.experiment_id]) for e in c.search_experiments())  # the VAE did not train either


def test_candidates_validation_and_sample_config() -> None:
    with pytest.raises(ValidationError, match="shared by all candidates"):
        CandidatesJob(snapshot="s", candidates=({"model": "ease", "snapshot": "other"},))
    with pytest.raises(ValidationError, match="unknown model"):
        CandidatesJob(snapshot="s", candidates=({"model": "nope"},))
    with pytest.raises(ValidationError):
        CandidatesJob(snapshot="s", candidates=())
    assert [j.model for j in CandidatesJob(snapshot="s").train_jobs("g")] == ["multivae-pia"]  # the default
    job = load_candidates(REPO / "configs" / "candidates.yaml", {"snapshot": "s", "mode": None})
    jobs = job.train_jobs("g")
    assert [j.model for j in jobs] == ["multivae-pia", "recvae-pia", "ease", "edlae"]
    assert all(j.snapshot == "s" and (j.epochs, j.patience) == (200, 20) and j.tags[GROUP_TAG] == "g" for j in jobs)
    assert (jobs[0].pia.weight, jobs[1].pia.weight) == (1.0, 0.1)  # the λ_A each family chose on validation
    assert job.mode == "enabled" and jobs[2].l2_grid == (100.0, 250.0, 500.0, 1000.0)
    assert jobs[3].l2_grid == (30.0, 100.0, 300.0, 1000.0)
    job = load_candidates(REPO / "configs" / "candidates.yaml", {"snapshot": "s", "common": {"device": "cpu"}})
    assert all(j.device == "cpu" and j.epochs == 200 for j in job.train_jobs("g"))  # merged into the file's common


def test_cli_train_candidates_dry_run(home: Path, synth_snapshot: str, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.cli.main import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("candidates:\n  - {model: ease, l2_grid: [50.0]}\n"
                   "gates: {popularity_margin: -0.5, coverage_floor: 0.0}\n")
    assert main(["train-candidates", "--config", str(cfg), "--snapshot", synth_snapshot, "--mode", "dry-run",
                 "--registered-name", NAME]) == 0
    out = capsys.readouterr().out
    assert "ease: ndcg@100=" in out and "champion none" in out  # dry-run: nothing promoted
    assert aliases() == {"challenger": "1"} and events() == []
