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

A move and its ledger line succeed or fail together: the caller checks the ledger first (Ledger.check: readable,
writable), and writes its line through `record` while the intent still stands; when `record` (or a later alias
call) fails, the aliases are put back as they were before the move and the command fails with one line.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
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

log = logging.getLogger(__name__)


def registered_model(name: str, tracking: str | None = None) -> Any:
    """The MLflow registered model `name`; a DataError when there is none (or the server cannot tell)."""
    from mlflow.exceptions import MlflowException

    try:
        return registry.client(tracking).get_registered_model(name)
    except MlflowException as e:
        failure = registry.server_failure(e, tracking)
        if failure is not None:
            raise failure from None
        raise DataError(f"no registered model {name!r}", "train one first (`recsys train`)") from None


def aliases(name: str, tracking: str | None = None) -> dict[str, str]:
    """The model's aliases now: alias → version."""
    return {k: str(v) for k, v in registered_model(name, tracking).aliases.items()}


def _apply(name: str, target: dict[str, str | None], tracking: str | None, champion_last: bool = True) -> None:
    c = registry.client(tracking)
    for alias in sorted(target, key=lambda a: (a == CHAMPION) == champion_last):  # champion last (or first: undo)
        v = target[alias]
        if v is None:
            if alias in aliases(name, tracking):
                c.delete_registered_model_alias(name, alias)
        else:
            c.set_registered_model_alias(name, alias, v)


def move_aliases(name: str, target: dict[str, str | None], tracking: str | None = None,
                 expect: dict[str, str | None] | None = None, record: Callable[[], object] | None = None,
                 _fail_after: int | None = None) -> dict[str, str | None]:
    """Move several aliases with an intent record (see module doc); returns the aliases before.

    `target`: alias → version, or None to delete the alias. `expect`: the aliases the caller's decision was
    based on; when any differs now, nothing moves. `record`: called once the aliases are moved, before the
    intent is cleared (the ledger line); if it raises, the move is undone and its error re-raised.
    `_fail_after` (tests) raises after that many alias calls, to simulate a crash mid-move (no undo).
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
    try:
        _apply(name, target, tracking)
        if record is not None:
            record()
    except BaseException as e:
        if not _undo(name, before, tracking, e) and isinstance(e, DataError):
            raise DataError(f"{e.problem}; the aliases could not be put back either (the intent record stays)",
                            f"once the tracking server answers, any gate/promote/rollback restores {before} "
                            f"(after {TXN_STALE_S} s); then {e.fix}") from None
        raise
    c.delete_registered_model_tag(name, TXN_TAG)
    return before


def _undo(name: str, before: dict[str, str | None], tracking: str | None, cause: BaseException) -> bool:
    """Put the aliases back as they were before a move that failed part-way (champion first: the vetted one is
    served again at once); False when that fails too: the intent then stays for the next command's repair()."""
    try:
        _apply(name, before, tracking, champion_last=False)
        registry.client(tracking).delete_registered_model_tag(name, TXN_TAG)
    except Exception as again:
        log.error("alias move of %s failed (%s) and could not be undone (%s); the next gate/promote/rollback "
                  "restores %s once the intent is %d s old", name, cause, again, before, TXN_STALE_S)
        return False
    log.warning("alias move of %s failed (%s); aliases restored to %s", name, cause, before)
    return True


def _age_s(stamp: Any) -> float:
    try:
        return (datetime.now(UTC) - datetime.fromisoformat(str(stamp))).total_seconds()
    except (TypeError, ValueError):
        return float("inf")  # no readable time: old format, treat as abandoned


def repair(name: str, ledger: Ledger, tracking: str | None = None) -> bool:
    """Undo an interrupted alias move (restore its 'before' aliases); True when something was repaired."""
    from mlflow.exceptions import MlflowException

    c = registry.client(tracking)
    try:
        tags = c.get_registered_model(name).tags
    except MlflowException as e:
        failure = registry.server_failure(e, tracking)
        if failure is not None:
            raise failure from None
        return False  # no such model: nothing to repair (the command says so next)
    if TXN_TAG not in tags:
        return False
    try:
        txn = json.loads(tags[TXN_TAG])
        before = {str(a): (None if v is None else registry.canonical_version(v)) for a, v in txn["before"].items()}
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise DataError(f"the alias-move intent of {name} (registered-model tag {TXN_TAG}) is unreadable: "
                        f"{tags[TXN_TAG][:120]!r}", f"check the aliases by hand, then delete the tag {TXN_TAG}") from e
    if _age_s(txn.get("time")) < TXN_STALE_S:
        return False  # maybe another command still moving aliases: its own end deletes the intent
    seen = aliases(name, tracking)
    _apply(name, before, tracking)
    # ledger line before the intent goes: if it cannot be written, the intent stays and the repair runs again
    ledger.append({"event": "repair", "model": name, "aliases_found": seen, "aliases_restored": before,
                   "interrupted_move": txn.get("after"),
                   "reason": "an alias move was interrupted; restored the aliases before it"})
    c.delete_registered_model_tag(name, TXN_TAG)
    return True
