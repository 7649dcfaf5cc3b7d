"""gate → promote → rollback on registered versions: aliases move only when they should, every event is ledgered."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import promotion, registry
from pipeline.cli import main
from pipeline.errors import DataError
from pipeline.gates import GateConfig
from pipeline.promotion import TXN_STALE_S, TXN_TAG, Ledger, aliases, gate, move_aliases, promote, rollback

from .conftest import NAME, copy_version, snapshot_digest


def events() -> list[str]:
    return [e["event"] for e in Ledger().read()]


def test_train_gate_promote_rollback_cycle(trained: dict[str, str], easy_gates: GateConfig, capsys) -> None:
    good, bad = trained["good"], trained["bad"]
    # first model ever: champion gates skipped, the rest apply
    o = gate(NAME, good, cfg=easy_gates)
    assert o.passed and o.promoted and o.champion is None
    assert {r.detail for r in o.results if r.gate.startswith("champion.")} == {"no champion: skipped"}
    assert aliases(NAME) == {"champion": good, "challenger": bad}
    c = registry.client()
    assert c.get_model_version(NAME, good).tags["gate.verdict"] == "passed"
    arts = {a.path for a in c.list_artifacts(trained["good_run"], "gate/enabled")}
    assert arts == {"gate/enabled/gate_report.md", "gate/enabled/gate_chart.png"}
    # a worse candidate is re-compared with the champion re-scored on the same users: rejected
    o2 = gate(NAME, bad, cfg=easy_gates)
    assert not o2.passed and not o2.promoted and o2.champion == good
    assert any(r.gate.startswith("champion.") and r.status == "fail" for r in o2.results)
    assert aliases(NAME) == {"champion": good, "challenger": bad}
    assert c.get_model_version(NAME, bad).tags["gate.verdict"] == "failed"
    # manual override through the CLI, then roll back
    assert main(["promote", "--model", NAME, "--version", bad, "--reason", "incident 42: force"]) == 0
    assert aliases(NAME) == {"champion": bad, "previous": good, "challenger": bad}
    assert main(["rollback", "--model", NAME, "--reason", "bad recs"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == \
        f"rolled back {NAME}: champion {bad} -> {good}, previous now None"
    assert aliases(NAME) == {"champion": good, "challenger": bad}  # good's own predecessor: none
    assert "rolled_back" in c.get_model_version(NAME, bad).tags
    with pytest.raises(ValueError, match="no 'previous'"):
        rollback(NAME)
    ledger = Ledger().read()
    assert [e["event"] for e in ledger] == ["promotion", "rejection", "manual-promotion", "rollback"]
    assert ledger[2]["reason"] == "incident 42: force" and ledger[1]["reason"].startswith("failed: champion.")
    assert ledger[0]["metrics"][f"candidate v{good}"]["ndcg@100"] > 0 and all("time" in e for e in ledger)


def test_rollback_restores_the_champion_before(trained: dict[str, str]) -> None:
    good, bad = trained["good"], trained["bad"]
    promote(NAME, good, "first")
    promote(NAME, bad, "second")
    promote(NAME, good, "third")  # previous = bad
    e = rollback(NAME)
    # champion back to bad; previous becomes bad's predecessor per the ledger (good) -- never the demoted one
    assert e["champion_after"] == bad and e["previous_after"] is None
    assert aliases(NAME)["champion"] == bad and "previous" not in aliases(NAME)


@pytest.mark.parametrize(("override", "failing"), [
    ({"floors": {"ndcg@100": 0.99}}, "floor.ndcg@100"),
    ({"coverage_floor": 1.0}, "coverage"),
    ({"ease_margin": -0.5}, "baseline.ease"),  # must beat EASE by 50%: cannot
    ({"popularity_margin": 3.0}, "baseline.popularity"),
])
def test_candidate_failing_a_gate_stays_challenger(trained: dict[str, str], easy_gates: GateConfig,
                                                   override: dict, failing: str) -> None:
    good, bad = trained["good"], trained["bad"]
    promote(NAME, bad, "a weak champion, so the champion gates pass")
    before = aliases(NAME)
    c = registry.client()
    c.set_registered_model_alias(NAME, "challenger", good)
    o = gate(NAME, good, cfg=easy_gates.model_copy(update=override))
    assert [r.gate for r in o.results if r.status == "fail"] == [failing]
    assert not o.promoted and aliases(NAME) == before | {"challenger": good}
    assert c.get_model_version(NAME, good).tags["gate.failed"] == failing
    assert events()[-1] == "rejection"


def test_dry_run_moves_nothing(trained: dict[str, str], easy_gates: GateConfig) -> None:
    before = aliases(NAME)
    assert main(["gate", "--model", NAME, "--version", trained["good"], "--mode", "dry-run"]) == 0  # default gates
    o = gate(NAME, trained["good"], mode="dry-run", cfg=easy_gates)
    assert o.passed and not o.promoted and aliases(NAME) == before and events() == []
    assert registry.client().get_model_version(NAME, trained["good"]).tags["gate.mode"] == "dry-run"


def test_gate_cli_exit_code_on_rejection(trained: dict[str, str], tmp_path: Path) -> None:
    f = tmp_path / "g.yaml"
    f.write_text("coverage_floor: 1.0\n")
    assert main(["gate", "--model", NAME, "--version", trained["good"], "--config", str(f)]) == 1
    assert main(["gate", "--model", NAME, "--version", "99"]) == 2  # unknown version: one-line error
    assert "champion" not in aliases(NAME)


def age_intent(seconds: int) -> None:
    """Backdate the left-over intent, as if its command had died that long ago."""
    c = registry.client()
    txn = json.loads(c.get_registered_model(NAME).tags[TXN_TAG])
    txn["time"] = (datetime.now(UTC) - timedelta(seconds=seconds)).isoformat(timespec="seconds")
    c.set_registered_model_tag(NAME, TXN_TAG, json.dumps(txn))


def test_interrupted_alias_move_is_repaired(trained: dict[str, str], easy_gates: GateConfig) -> None:
    good, bad = trained["good"], trained["bad"]
    promote(NAME, good, "start")
    with pytest.raises(RuntimeError, match="simulated crash"):
        move_aliases(NAME, {"previous": good, "champion": bad}, _fail_after=1)  # previous moved, champion not yet
    assert aliases(NAME)["champion"] == good  # champion moves last: serving never saw a half-done move
    c = registry.client()
    assert TXN_TAG in c.get_registered_model(NAME).tags
    # a fresh intent may be another command's move in flight: left alone, and no new move starts over it
    half = aliases(NAME)
    with pytest.raises(DataError, match=r"in flight or was interrupted.*Fix: retry"):
        promote(NAME, bad, "during someone else's move")
    assert aliases(NAME) == half and TXN_TAG in c.get_registered_model(NAME).tags and events() == ["manual-promotion"]
    age_intent(TXN_STALE_S + 60)
    gate(NAME, bad, cfg=easy_gates)  # any alias-moving command repairs an abandoned intent first
    assert TXN_TAG not in c.get_registered_model(NAME).tags
    ledger = Ledger().read()
    assert [e["event"] for e in ledger] == ["manual-promotion", "repair", "rejection"]
    assert ledger[1]["aliases_restored"] == {"previous": None, "champion": good}
    assert aliases(NAME)["champion"] == good and "previous" not in aliases(NAME)


def test_ledger_uri_is_configurable(trained: dict[str, str], tmp_path: Path) -> None:
    uri = str(tmp_path / "elsewhere" / "ledger.jsonl")
    promote(NAME, trained["good"], "x", ledger_uri=uri)
    assert [json.loads(x)["event"] for x in Path(uri).read_text().splitlines()] == ["manual-promotion"]
    assert events() == []


@pytest.mark.data
def test_cycle_on_ml_latest_small(home: Path, shared_data: Path, easy_gates: GateConfig, capsys) -> None:
    from model.split import strong_generalization_split
    from pipeline.dataset import BinarizeRule, load_dataset
    from pipeline.snapshot import write_snapshot

    data = load_dataset("ml-latest-small", shared_data, BinarizeRule(min_rating=4.0))
    split = strong_generalization_split(data.matrix, seed=0, n_valid=0.1, n_test=0.1)
    snap = write_snapshot(str(home / "snap-ml-small"), data.user_ids, data.item_ids, split)
    cfg = home / "tiny.yaml"
    cfg.write_text("epochs: 1\nbatch_size: 100\nmax_ease_items: 1000\nvae: {hidden_dims: [32], latent_dim: 8}\n")
    versions = []
    for seed in ("0", "1"):
        (home / "seed.yaml").write_text(cfg.read_text() + f"seed: {seed}\n")
        assert main(["train", "--snapshot", snap, "--config", str(home / "seed.yaml"), "--device", "cpu",
                     "--no-compare-base", "--registered-name", NAME]) == 0
        last = capsys.readouterr().out.strip().splitlines()[-1]
        assert last.startswith(f"registered {NAME} version ")
        versions.append(last.rsplit(" ", 1)[-1])
    lenient = easy_gates.model_copy(update={"champion_tolerance": 1.0, "coverage_floor": 0.0, "popularity_margin": -0.9,
                                           "floors": {"ndcg@100": 0.01}})  # 1 tiny epoch: a pipeline test, not a quality one
    o = gate(NAME, versions[0], cfg=lenient)
    assert o.promoted and next(r for r in o.results if r.gate == "baseline.ease").status == "skipped"
    assert gate(NAME, versions[1], cfg=lenient).promoted
    assert aliases(NAME) == {"champion": versions[1], "previous": versions[0]}
    rollback(NAME)
    assert aliases(NAME)["champion"] == versions[0]
    import mlflow.pyfunc

    m = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    out = m.predict(pd.DataFrame({"item_ids": [data.item_ids[:3].tolist()]}), params={"k": 10})
    assert len(out["item_ids"][0]) == 10 and not set(out["item_ids"][0]) & set(data.item_ids[:3].tolist())
    assert np.all(np.diff(out["scores"][0]) <= 0)
    assert events() == ["promotion", "promotion", "rollback"]


def state() -> tuple[dict[str, str], list[dict]]:
    return aliases(NAME), Ledger().read()


def test_version_strings_are_canonical(trained: dict[str, str], easy_gates: GateConfig) -> None:
    good, bad = trained["good"], trained["bad"]
    promote(NAME, good, "first")
    promote(NAME, bad, "second")  # champion bad, previous good
    before = state()
    with pytest.raises(DataError, match=f"version {bad} is already the champion"):
        promote(NAME, f"0{bad}", "the same version, spelled differently")
    assert main(["promote", "--model", NAME, "--version", f"00{bad}", "--reason", "again"]) == 2
    assert state() == before  # `previous` (good) not lost
    o = gate(NAME, f"0{good}", cfg=easy_gates)  # good beats bad: promoted under its canonical number
    assert o.version == good and o.promoted
    assert aliases(NAME) == {"champion": good, "previous": bad, "challenger": bad}
    assert Ledger().read()[-1]["version"] == good
    assert registry.client().get_model_version(NAME, good).tags["gate.verdict"] == "passed"


@pytest.mark.parametrize("version", ["0", "-1", "abc", "", "1.0", " 1", "+1", "١"])
def test_bad_version_strings_are_refused(trained: dict[str, str], easy_gates: GateConfig, version: str) -> None:
    promote(NAME, trained["good"], "a champion to keep")
    before = state()
    with pytest.raises(DataError, match=r"is not a positive integer.*Fix: pass a registered version number"):
        promote(NAME, version, "x")
    with pytest.raises(DataError, match="is not a positive integer"):
        gate(NAME, version, cfg=easy_gates)
    assert main(["gate", "--model", NAME, "--version", version]) == 2
    assert state() == before


def test_gate_refuses_when_aliases_moved_while_scoring(trained: dict[str, str], easy_gates: GateConfig,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    good, bad = trained["good"], trained["bad"]
    promote(NAME, bad, "1")
    promote(NAME, good, "2")  # champion good, previous bad
    cand = copy_version(good)  # same weights as the champion: passes against it
    real, calls = promotion.rescore, []

    def rescore_during_rollback(*a, **kw):
        if not calls:
            rollback(NAME, reason="operator pulls good while the gate scores")
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(promotion, "rescore", rescore_during_rollback)
    after_rollback = {"champion": bad, "challenger": bad}  # trained last: bad is the challenger
    with pytest.raises(DataError, match=f"changed while this command ran \\(champion: {good} -> {bad}, "
                                        f"previous: {bad} -> none\\).*Fix: re-run the command"):
        gate(NAME, cand, cfg=easy_gates)
    assert aliases(NAME) == after_rollback  # the rollback stands
    assert events() == ["manual-promotion", "manual-promotion", "rollback"]
    assert "gate.verdict" not in registry.client().get_model_version(NAME, cand).tags


@pytest.mark.parametrize("broken", ["chart", "log_artifact"])
def test_gate_artifact_failure_is_a_warning_not_a_failed_gate(trained: dict[str, str], easy_gates: GateConfig,
                                                               monkeypatch: pytest.MonkeyPatch, caplog,
                                                               broken: str) -> None:
    from mlflow import MlflowClient

    from pipeline import plots

    def boom(*a, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(*((plots, "gate_chart", boom) if broken == "chart" else (MlflowClient, "log_artifact", boom)))
    good = trained["good"]
    with caplog.at_level(logging.WARNING, logger="pipeline.promotion"):
        o = gate(NAME, good, cfg=easy_gates)
    assert o.passed and o.promoted and aliases(NAME)["champion"] == good
    c = registry.client()
    assert c.get_model_version(NAME, good).tags["gate.verdict"] == "passed"
    assert events() == ["promotion"] and Ledger().read()[0]["version"] == good
    assert any("OSError: disk full" in w for w in o.warnings)
    assert "disk full" in caplog.text and "the verdict and the ledger line are recorded" in caplog.text
    # the later steps still ran (artifacts live in a store shared between tests; metrics are private)
    assert "gate.candidate.ndcg_at_100" in c.get_run(trained["good_run"]).data.metrics


@pytest.mark.parametrize("n_deleted", [1, 2])
def test_rollback_skips_deleted_ledger_versions(trained: dict[str, str], caplog, n_deleted: int) -> None:
    good, bad = trained["good"], trained["bad"]
    v3, v4 = copy_version(good), copy_version(good)
    for v in (v4, v3, good, bad):  # chain: v4 -> v3 -> good -> bad
        promote(NAME, v, f"to {v}")
    c = registry.client()
    gone = [v3, v4][:n_deleted]
    for v in gone:
        c.delete_model_version(NAME, v)
    with caplog.at_level(logging.WARNING, logger="pipeline.promotion"):
        e = rollback(NAME)
    expect_prev = v4 if n_deleted == 1 else None
    assert e["champion_after"] == good and e["previous_after"] == expect_prev
    assert aliases(NAME) == {"champion": good, "challenger": bad} | ({"previous": v4} if expect_prev else {})
    assert f"predecessor(s) {', '.join(gone)} of version {good} no longer exist" in e["warning"]
    assert ("previous left empty" if n_deleted == 2 else f"previous is now {v4}") in caplog.text
    assert Ledger().read()[-1]["warning"] == e["warning"]
    if expect_prev:  # the next rollback works too
        assert rollback(NAME)["champion_after"] == v4


def test_snapshot_rebuilt_since_training_is_refused(trained: dict[str, str], easy_gates: GateConfig, caplog) -> None:
    good, bad = trained["good"], trained["bad"]
    c = registry.client()
    uri = c.get_model_version(NAME, good).tags["snapshot_uri"]
    promote(NAME, bad, "a champion to keep")
    before = state()
    c.set_model_version_tag(NAME, good, "snapshot_digest", "0" * 16)  # trained on another build of that folder
    with pytest.raises(DataError, match=r"was rebuilt since .* was trained.*Fix: retrain on the current snapshot"):
        gate(NAME, good, cfg=easy_gates)
    assert state() == before and c.get_model_version(NAME, good).tags["gate.verdict"] == "pending"
    c.set_model_version_tag(NAME, good, "snapshot_digest", snapshot_digest(uri))
    with caplog.at_level(logging.WARNING, logger="pipeline.promotion"):
        o = gate(NAME, good, cfg=easy_gates)
    assert o.promoted and o.warnings == [] and "snapshot_digest" not in caplog.text
    older = copy_version(good)  # registered before digests: gated as before, with a warning
    c.delete_model_version_tag(NAME, older, "snapshot_digest")
    o = gate(NAME, older, cfg=easy_gates, mode="dry-run")
    assert o.passed and "has no snapshot_digest tag" in o.warnings[0] and "has no snapshot_digest tag" in o.report
    assert "has no snapshot_digest tag" in caplog.text


def test_gate_without_baselines_fails_closed(trained: dict[str, str], easy_gates: GateConfig) -> None:
    good, bad = trained["good"], trained["bad"]
    c = registry.client()
    for k in [k for k in c.get_model_version(NAME, good).tags if k.startswith("baseline.")]:
        c.delete_model_version_tag(NAME, good, k)  # as if trained with `baselines: false`
    o = gate(NAME, good, cfg=easy_gates)  # first model: champion gates skipped, so only floors would remain
    assert not o.promoted and "champion" not in aliases(NAME) and events() == ["rejection"]
    base = [r for r in o.results if r.gate.startswith("baseline.")]
    assert [r.status for r in base] == ["fail", "fail"]
    assert all("baselines were not computed at training (baselines: false)" in r.detail for r in base)
    assert "missing baselines (trained with baselines: false) fail the gate" in o.report
    o = gate(NAME, good, cfg=easy_gates.model_copy(update={"allow_missing_baselines": True}))
    assert o.promoted and aliases(NAME) == {"champion": good, "challenger": bad}
    assert {r.status for r in o.results if r.gate.startswith("baseline.")} == {"skipped"}
