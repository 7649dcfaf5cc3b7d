"""Moving a registered model's aliases (`champion`, `previous`), safely, and repairing a move that was cut short.

Interruption safety. Moving aliases is two MLflow calls (previous, then champion), not a transaction. Before
the first call an intent record (registered-model tag `recsys.alias_txn`: the aliases before and after) is
written; after the last call it is deleted. Champion is always moved LAST, so a crash in between never
serves an unvetted model. Every command that moves aliases first looks for a left-over intent older than
TXN_STALE_S and repairs it by restoring the "before" aliases (always safe: the old champion was vetted),
recording a `repair` event in the ledger; the operator then re-runs the gate. A younger intent may be another
command's move in flight: it is left alone and a move refuses to start while any intent exists. A move also
refuses when the aliases differ from what its command read (`expect`): the gate scores for minutes, and must
not undo a rollback made meanwhile.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from pipeline.errors import DataError
from pipeline.io import registry
from pipeline.io.registry import CHAMPION
from pipeline.training.ledger import Ledger, utc_now

TXN_TAG = "recsys.alias_txn"
# An alias move takes a few MLflow calls (seconds, or a couple of minutes of client retries); an intent older
# than this is one whose command died. Age, not process ownership: the command may run on another machine.
TXN_STALE_S = 600


def registered_model(name: str, tracking: str | None = None) -> Any:
    """The MLflow registered model `name`; a DataError when there is none."""
    from mlflow.exceptions import MlflowException

    try:
        return registry.client(tracking).get_registered_model(name)
    except MlflowException as e:
        raise DataError(f"no registered model {name!r}", "train one first (`recsys train`)") from e


def aliases(name: str, tracking: str | None = None) -> dict[str, str]:
    """The model's aliases now: alias → version."""
    return {k: str(v) for k, v in registered_model(name, tracking).aliases.items()}


def _apply(name: str, target: dict[str, str | None], tracking: str | None) -> None:
    c = registry.client(tracking)
    for alias in sorted(target, key=lambda a: a == CHAMPION):  # champion last
        v = target[alias]
        if v is None:
            if alias in aliases(name, tracking):
                c.delete_registered_model_alias(name, alias)
        else:
            c.set_registered_model_alias(name, alias, v)


def move_aliases(name: str, target: dict[str, str | None], tracking: str | None = None,
                 expect: dict[str, str | None] | None = None, _fail_after: int | None = None) -> dict[str, str | None]:
    """Move several aliases with an intent record (see module doc); returns the aliases before.

    `target`: alias → version, or None to delete the alias. `expect`: the aliases the caller's decision was
    based on; when any differs now, nothing moves. `_fail_after` (tests) raises after that many alias calls,
    to simulate a crash mid-move.
    """
    c = registry.client(tracking)
    model = registered_model(name, tracking)
    if TXN_TAG in model.tags:
        raise DataError(f"another alias move of {name} is in flight or was interrupted ({model.tags[TXN_TAG]}); "
                        "nothing was moved", f"retry in a minute; an intent older than {TXN_STALE_S} s is repaired "
                        "by the next gate/promote/rollback")
    now = {k: str(v) for k, v in model.aliases.items()}
    changed = {a: (v, now.get(a)) for a, v in (expect or {}).items() if now.get(a) != v}
    if changed:
        diff = ", ".join(f"{a}: {old or 'none'} -> {new or 'none'}" for a, (old, new) in changed.items())
        raise DataError(f"aliases of {name} changed while this command ran ({diff}), e.g. by a rollback; "
                        "nothing was moved", "re-run the command (a gate re-scores against the current champion)")
    before: dict[str, str | None] = {a: now.get(a) for a in target}
    c.set_registered_model_tag(name, TXN_TAG, json.dumps({"before": before, "after": target, "time": utc_now()}))
    if _fail_after is not None:
        _apply(name, dict(sorted(target.items(), key=lambda kv: kv[0] == CHAMPION)[:_fail_after]), tracking)
        raise RuntimeError("simulated crash while moving aliases")
    _apply(name, target, tracking)
    c.delete_registered_model_tag(name, TXN_TAG)
    return before


def _age_s(stamp: Any) -> float:
    try:
        return (datetime.now(UTC) - datetime.fromisoformat(str(stamp))).total_seconds()
    except (TypeError, ValueError):
        return float("inf")  # no readable time: old format, treat as abandoned


def repair(name: str, ledger: Ledger, tracking: str | None = None) -> bool:
    """Undo an interrupted alias move (restore its 'before' aliases); True when something was repaired."""
    c = registry.client(tracking)
    try:
        tags = c.get_registered_model(name).tags
    except Exception:
        return False
    if TXN_TAG not in tags:
        return False
    txn = json.loads(tags[TXN_TAG])
    if _age_s(txn.get("time")) < TXN_STALE_S:
        return False  # maybe another command still moving aliases: its own end deletes the intent
    seen = aliases(name, tracking)
    _apply(name, txn["before"], tracking)
    c.delete_registered_model_tag(name, TXN_TAG)
    ledger.append({"event": "repair", "model": name, "aliases_found": seen, "aliases_restored": txn["before"],
                   "interrupted_move": txn["after"], "reason": "an alias move was interrupted; restored the aliases before it"})
    return True
