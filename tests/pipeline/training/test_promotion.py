"""train → gate → promote → rollback on registered versions (PromoteJob, RollbackJob): aliases move only when
they should, every event is ledgered."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.cli.main import main
from pipeline.errors import DataError
from pipeline.io import registry
from pipeline.training.gates import GateConfig
from pipeline.training.ledger import Ledger
from pipeline.training.promotion import AliasMoveResult

from .conftest import NAME, aliases, copy_version, events, gate, promote, rollback, state


def test_train_gate_promote_rollback_cycle(trained: dict[str, str], easy_gates: GateConfig, capsys) -> None:
    good, bad = trained["good"], trained["bad"]
    # first model ever: champion gates skipped, the rest apply
    o = gate(good, gates=easy_gates)
    assert o.passed and o.promoted and o.champion is None
    assert {r.detail for r in o.verdicts if r.gate.startswith("champion.")} == {"no champion: skipped"}
    assert aliases() == {"champion": good, "challenger": bad}
    c = registry.client()
    assert c.get_model_version(NAME, good).tags["gate.verdict"] == "passed"
    arts = {a.path for a in c.list_artifacts(trained["good_run"], "gate/enabled")}
    assert arts == {"gate/enabled/gate_report.md", "gate/enabled/gate_chart.png", "gate/enabled/gate_report.html"}
    # a worse candidate is re-compared with the champion re-scored on the same users: rejected
    o2 = gate(bad, gates=easy_gates)
    assert not o2.passed and not o2.promoted and o2.champion == good
    assert any(r.gate.startswith("champion.") and r.status == "fail" for r in o2.verdicts)
    assert aliases() == {"champion": good, "challenger": bad}
    assert c.get_model_version(NAME, bad).tags["gate.verdict"] == "failed"
    # manual override through the CLI, then roll back
    assert main(["promote", "--model", NAME, "--model-version", bad, "--reason", "incident 42: force"]) == 0
    assert aliases() == {"champion": bad, "previous": good, "challenger": bad}
    assert main(["rollback", "--model", NAME, "--reason", "bad recs"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == \
        f"rolled back {NAME}: champion {bad} -> {good}, previous now None"
    assert aliases() == {"champion": good, "challenger": bad}  # good's own predecessor: none
    assert "rolled_back" in c.get_model_version(NAME, bad).tags
    with pytest.raises(ValueError, match="no 'previous'"):
        rollback()
    ledger = Ledger().read()
    assert [e["event"] for e in ledger] == ["promotion", "rejection", "manual-promotion", "rollback"]
    assert ledger[2]["reason"] == "incident 42: force" and ledger[1]["reason"].startswith("failed: champion.")
    assert ledger[0]["metrics"][f"candidate v{good}"]["ndcg@100"] > 0 and all("time" in e for e in ledger)


def test_rollback_restores_the_champion_before(trained: dict[str, str]) -> None:
    good, bad = trained["good"], trained["bad"]
    promote(good, "first")
    promote(bad, "second")
    p = promote(good, "third")  # previous = bad
    assert (p.event, p.version, p.champion_before, p.champion_after, p.previous_after) == \
        ("manual-promotion", good, bad, good, bad)
    e = rollback()
    # champion back to bad; previous becomes bad's predecessor per the ledger (good) -- never the demoted one
    assert e.champion_after == bad and e.previous_after is None
    assert e == AliasMoveResult(model_name=NAME, event="rollback", version=bad, champion_before=good,
                                champion_after=bad, previous_after=None, warning=None)
    assert AliasMoveResult.model_validate(e.to_xcom()) == e
    assert aliases()["champion"] == bad and "previous" not in aliases()


def test_ledger_uri_is_configurable(trained: dict[str, str], tmp_path: Path) -> None:
    uri = str(tmp_path / "elsewhere" / "ledger.jsonl")
    promote(trained["good"], "x", ledger_uri=uri)
    assert [json.loads(x)["event"] for x in Path(uri).read_text().splitlines()] == ["manual-promotion"]
    assert events() == []


def test_version_strings_are_canonical(trained: dict[str, str], easy_gates: GateConfig) -> None:
    good, bad = trained["good"], trained["bad"]
    promote(good, "first")
    promote(bad, "second")  # champion bad, previous good
    before = state()
    with pytest.raises(DataError, match=f"version {bad} is already the champion"):
        promote(f"0{bad}", "the same version, spelled differently")
    assert main(["promote", "--model", NAME, "--model-version", f"00{bad}", "--reason", "again"]) == 2
    assert state() == before  # `previous` (good) not lost
    o = gate(f"0{good}", gates=easy_gates)  # good beats bad: promoted under its canonical number
    assert o.version == good and o.promoted
    assert aliases() == {"champion": good, "previous": bad, "challenger": bad}
    assert Ledger().read()[-1]["version"] == good
    assert registry.client().get_model_version(NAME, good).tags["gate.verdict"] == "passed"


@pytest.mark.parametrize("version", ["0", "-1", "abc", "", "1.0", " 1", "+1", "١"])
def test_bad_version_strings_are_refused(trained: dict[str, str], easy_gates: GateConfig, version: str) -> None:
    promote(trained["good"], "a champion to keep")
    before = state()
    with pytest.raises(DataError, match=r"is not a positive integer.*Fix: pass a registered version number"):
        promote(version, "x")
    with pytest.raises(DataError, match="is not a positive integer"):
        gate(version, gates=easy_gates)
    assert main(["gate", "--model", NAME, "--model-version", version]) == 2
    assert state() == before


@pytest.mark.parametrize("n_deleted", [1, 2])
def test_rollback_skips_deleted_ledger_versions(trained: dict[str, str], caplog, n_deleted: int) -> None:
    good, bad = trained["good"], trained["bad"]
    v3, v4 = copy_version(good), copy_version(good)
    for v in (v4, v3, good, bad):  # chain: v4 -> v3 -> good -> bad
        promote(v, f"to {v}")
    c = registry.client()
    gone = [v3, v4][:n_deleted]
    for v in gone:
        c.delete_model_version(NAME, v)
    with caplog.at_level(logging.WARNING, logger="pipeline.training.promotion"):
        e = rollback()
    expect_prev = v4 if n_deleted == 1 else None
    assert e.champion_after == good and e.previous_after == expect_prev
    assert aliases() == {"champion": good, "challenger": bad} | ({"previous": v4} if expect_prev else {})
    assert f"predecessor(s) {', '.join(gone)} of version {good} no longer exist" in e.warning
    assert ("previous left empty" if n_deleted == 2 else f"previous is now {v4}") in caplog.text
    assert Ledger().read()[-1]["warning"] == e.warning
    if expect_prev:  # the next rollback works too
        assert rollback().champion_after == v4


@pytest.mark.data
def test_cycle_on_ml_latest_small(home: Path, shared_data: Path, easy_gates: GateConfig, capsys) -> None:
    from model.split import strong_generalization_split
    from pipeline.data.dataset import BinarizeRule, load_dataset
    from pipeline.io.snapshot import write_snapshot

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
        version = registry.alias_version(NAME, "challenger")  # the newest trained version
        assert capsys.readouterr().out.strip().splitlines()[-1] == f"registered {NAME} version {version}"  # for humans
        versions.append(version)
    lenient = easy_gates.model_copy(update={"champion_tolerance": 1.0, "coverage_floor": 0.0, "popularity_margin": -0.9,
                                           "floors": {"ndcg@100": 0.01}})  # 1 tiny epoch: a pipeline test, not a quality one
    o = gate(versions[0], gates=lenient)
    assert o.promoted and next(r for r in o.verdicts if r.gate == "baseline.ease").status == "skipped"
    assert gate(versions[1], gates=lenient).promoted
    assert aliases() == {"champion": versions[1], "previous": versions[0]}
    rollback()
    assert aliases()["champion"] == versions[0]
    import mlflow.pyfunc

    m = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    out = m.predict(pd.DataFrame({"item_ids": [data.item_ids[:3].tolist()]}), params={"k": 10})
    assert len(out["item_ids"][0]) == 10 and not set(out["item_ids"][0]) & set(data.item_ids[:3].tolist())
    assert np.all(np.diff(out["scores"][0]) <= 0)
    assert events() == ["promotion", "promotion", "rollback"]
