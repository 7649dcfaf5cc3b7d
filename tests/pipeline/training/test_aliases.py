"""pipeline.training.aliases: an interrupted alias move never serves a half-done move, and is repaired."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pipeline.cli.main import main
from pipeline.errors import DataError
from pipeline.io import registry
from pipeline.training.aliases import TXN_STALE_S, TXN_TAG, move_aliases
from pipeline.training.gates import GateConfig
from pipeline.training.ledger import Ledger

from .conftest import NAME, aliases, copy_version, events, gate, promote, rollback, state


def age_intent(seconds: int) -> None:
    """Backdate the left-over intent, as if its command had died that long ago."""
    c = registry.client()
    txn = json.loads(c.get_registered_model(NAME).tags[TXN_TAG])
    txn["time"] = (datetime.now(UTC) - timedelta(seconds=seconds)).isoformat(timespec="seconds")
    c.set_registered_model_tag(NAME, TXN_TAG, json.dumps(txn))


def test_interrupted_alias_move_is_repaired(trained: dict[str, str], easy_gates: GateConfig) -> None:
    good, bad = trained["good"], trained["bad"]
    promote(good, "start")
    with pytest.raises(RuntimeError, match="simulated crash"):
        move_aliases(NAME, {"previous": good, "champion": bad}, _fail_after=1)  # previous moved, champion not yet
    assert aliases()["champion"] == good  # champion moves last: serving never saw a half-done move
    c = registry.client()
    assert TXN_TAG in c.get_registered_model(NAME).tags
    # a fresh intent may be another command's move in flight: left alone, and no new move starts over it
    half = aliases()
    with pytest.raises(DataError, match=r"in flight or was interrupted.*Fix: retry"):
        promote(bad, "during someone else's move")
    assert aliases() == half and TXN_TAG in c.get_registered_model(NAME).tags and events() == ["manual-promotion"]
    age_intent(TXN_STALE_S + 60)
    gate(bad, gates=easy_gates)  # any alias-moving command repairs an abandoned intent first
    assert TXN_TAG not in c.get_registered_model(NAME).tags
    ledger = Ledger().read()
    assert [e["event"] for e in ledger] == ["manual-promotion", "repair", "rejection"]
    assert ledger[1]["aliases_restored"] == {"previous": None, "champion": good}
    assert aliases()["champion"] == good and "previous" not in aliases()


# -- an alias move and its ledger line succeed or fail together (issue 32, item 4) ------------------------------

EASY_YAML = "floors: {ndcg@100: 0.05}\npopularity_margin: -0.5\nease_margin: 0.9\ncoverage_floor: 0.05\n"


def _argv(command: str, tmp_path: Path, version: str) -> list[str]:
    gates = tmp_path / "easy.yaml"
    gates.write_text(EASY_YAML)
    return {"gate": ["gate", "--model-version", version, "--config", str(gates)],
            "promote": ["promote", "--model-version", version, "--reason", "test"],
            "rollback": ["rollback", "--reason", "test"]}[command] + ["--model", NAME]


@pytest.mark.parametrize("command", ["gate", "promote", "rollback"])
def test_unwritable_ledger_moves_no_alias(trained: dict[str, str], tmp_path: Path, capsys, command: str) -> None:
    good, bad = trained["good"], trained["bad"]
    promote(bad, "first")
    promote(good, "second")  # champion good, previous bad: each command below would move both
    cand = copy_version(good)  # same weights as the champion: passes the gate
    before = state()
    (tmp_path / "a-file").write_text("in the way")
    blocked = str(tmp_path / "a-file" / "ledger.jsonl")  # its parent is a file (root ignores chmod)
    capsys.readouterr()
    assert main([*_argv(command, tmp_path, cand if command == "gate" else bad), "--ledger", blocked]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"promotion ledger {blocked} cannot be written" in err[0], err
    assert "nothing was moved" in err[0] and "Fix: pass --ledger" in err[0]
    assert state() == before and TXN_TAG not in registry.client().get_registered_model(NAME).tags
    assert "gate.verdict" not in registry.client().get_model_version(NAME, cand).tags  # no verdict recorded
    r = rollback()  # the ledger still names good's predecessor: a later rollback finds it
    assert (r.champion_before, r.champion_after) == (good, bad)


@pytest.mark.parametrize("command", ["gate", "promote", "rollback"])
def test_ledger_failing_after_the_move_puts_the_aliases_back(trained: dict[str, str], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch, capsys, command: str) -> None:
    good, bad = trained["good"], trained["bad"]
    promote(bad, "first")
    promote(good, "second")
    cand = copy_version(good)
    before = state()
    real = Ledger.append

    def disk_full(self, event):
        if event["event"] in ("promotion", "manual-promotion", "rollback"):  # the line of the move itself
            raise DataError(f"promotion ledger {self.loc.uri} cannot be written (No space left on device)", "free space")
        return real(self, event)

    monkeypatch.setattr(Ledger, "append", disk_full)
    capsys.readouterr()
    assert main(_argv(command, tmp_path, cand if command == "gate" else bad)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0]
    assert state() == before  # aliases as before the move, no ledger line
    assert TXN_TAG not in registry.client().get_registered_model(NAME).tags  # undone at once, not left for repair
    assert "gate.verdict" not in registry.client().get_model_version(NAME, cand).tags


@pytest.mark.parametrize("bad_line", ['{"event": "promotion", "model"', "[1, 2]", "\xff\xfe"])
@pytest.mark.parametrize("command", ["gate", "promote", "rollback"])
def test_corrupt_ledger_is_one_line_naming_it_and_moves_nothing(trained: dict[str, str], tmp_path: Path, capsys,
                                                                 command: str, bad_line: str) -> None:
    good, bad = trained["good"], trained["bad"]
    promote(bad, "first")
    promote(good, "second")
    cand = copy_version(good)
    ledger = Path(trained["home"]) / "promotion-ledger.jsonl"
    with open(ledger, "ab") as f:
        f.write(bad_line.encode("latin-1") + b"\n")
    before_aliases, before_bytes = aliases(), ledger.read_bytes()
    capsys.readouterr()
    assert main(_argv(command, tmp_path, cand if command == "gate" else bad)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"promotion ledger {ledger}" in err[0] and "Fix: move the damaged line" in err[0], err
    assert ("line 3" in err[0]) or ("not UTF-8" in err[0])
    assert aliases() == before_aliases and ledger.read_bytes() == before_bytes


def test_unreadable_intent_is_one_line(trained: dict[str, str], capsys) -> None:
    promote(trained["good"], "start")
    registry.client().set_registered_model_tag(NAME, TXN_TAG, "{not json")
    before = aliases()
    assert main(["promote", "--model", NAME, "--model-version", trained["bad"], "--reason", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"tag {TXN_TAG}) is unreadable" in err[0] and aliases() == before
