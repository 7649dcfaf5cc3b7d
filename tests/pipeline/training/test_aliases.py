"""pipeline.training.aliases: an interrupted alias move never serves a half-done move, and is repaired."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from pipeline.errors import DataError
from pipeline.io import registry
from pipeline.training.aliases import TXN_STALE_S, TXN_TAG, move_aliases
from pipeline.training.gates import GateConfig
from pipeline.training.ledger import Ledger

from .conftest import NAME, aliases, events, gate, promote


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
