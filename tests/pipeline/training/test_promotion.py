"""gate → promote → rollback on registered versions: aliases move only when they should, every event is ledgered."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import registry
from pipeline.cli import main
from pipeline.gates import GateConfig
from pipeline.promotion import TXN_TAG, Ledger, aliases, gate, move_aliases, promote, rollback

from .conftest import NAME


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


def test_interrupted_alias_move_is_repaired(trained: dict[str, str], easy_gates: GateConfig) -> None:
    good, bad = trained["good"], trained["bad"]
    promote(NAME, good, "start")
    with pytest.raises(RuntimeError, match="simulated crash"):
        move_aliases(NAME, {"previous": good, "champion": bad}, _fail_after=1)  # previous moved, champion not yet
    assert aliases(NAME)["champion"] == good  # champion moves last: serving never saw a half-done move
    c = registry.client()
    assert TXN_TAG in c.get_registered_model(NAME).tags
    gate(NAME, bad, cfg=easy_gates)  # any alias-moving command repairs first
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
