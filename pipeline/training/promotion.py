"""`recsys promote | rollback`: the manual overrides of the gate, each recorded in the ledger with its reason.

Promote: champion ← the version, previous ← the old champion (or `previous` kept when there was none); no gates.
The version is tagged `gate.verdict: manual override` and `gate.override_reason`.

Rollback: champion ← previous; previous ← the version that was champion before the restored one (read from
the ledger's promotion events, walking past versions deleted from the registry), or no `previous` when the
ledger has none. The demoted version never becomes `previous` (it is tagged `rolled_back`), so a second
rollback cannot re-serve the model just pulled.

Both first check the ledger (readable and writable: Ledger.check), repair an interrupted alias move and move
aliases through pipeline.training.aliases (intent record, champion last, refused when the aliases changed since
they were read, undone when the ledger line cannot be written). Versions from outside (CLI, ledger) are
canonical integers (registry.canonical_version): '02' is '2'. MLflow errors are one redacted DataError line
(registry.tracking_errors).
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline.errors import DataError
from pipeline.io import registry
from pipeline.io.registry import CHAMPION, PREVIOUS
from pipeline.job import Job, JobResult
from pipeline.training.aliases import aliases, move_aliases, repair
from pipeline.training.ledger import Ledger, utc_now

log = logging.getLogger(__name__)


class AliasMoveResult(JobResult):
    """What a manual promotion or rollback did, from its ledger line: `version` is the new champion."""

    model_name: str
    event: str  # 'manual-promotion' or 'rollback'
    version: str
    champion_before: str | None
    champion_after: str
    previous_after: str | None
    warning: str | None = None


class PromoteJob(Job):
    """Manual override: champion ← version (previous ← old champion), no gates; `reason` is required."""

    model_name: str
    version: str
    reason: str
    ledger_uri: str | None = None
    tracking_uri: str | None = None

    def run(self) -> AliasMoveResult:
        """Move the aliases and record a `manual-promotion` ledger line; refuses the current champion."""
        with registry.tracking_errors(self.tracking_uri):
            return self._run()

    def _run(self) -> AliasMoveResult:
        name, tracking = self.model_name, self.tracking_uri
        if not self.reason.strip():
            raise DataError("a manual promotion needs a reason; nothing was moved",
                            "pass --reason with the incident or review it follows")
        version = registry.canonical_version(self.version)
        ledger = Ledger(self.ledger_uri)
        ledger.check()
        c = registry.client(tracking)
        repair(name, ledger, tracking)
        if not registry.version_exists(name, version, tracking):
            raise DataError(f"no version {version} of registered model {name!r}; nothing was moved",
                            "check --model/--model-version")
        now = aliases(name, tracking)
        old = now.get(CHAMPION)
        if old == version:
            raise DataError(f"{name} version {version} is already the champion; nothing was moved",
                            "pick another version, or `recsys rollback` to serve `previous`")
        new_previous = old if old is not None else now.get(PREVIOUS)
        entries: list[dict[str, Any]] = []
        move_aliases(name, {PREVIOUS: new_previous, CHAMPION: version}, tracking,
                     expect={CHAMPION: old, PREVIOUS: now.get(PREVIOUS)},
                     record=lambda: entries.append(ledger.append({
                         "event": "manual-promotion", "model": name, "version": version, "champion_before": old,
                         "champion_after": version, "reason": self.reason})))
        c.set_model_version_tag(name, version, "gate.verdict", "manual override")
        c.set_model_version_tag(name, version, "gate.override_reason", self.reason)
        return _result(entries[0], previous_after=new_previous)


class RollbackJob(Job):
    """champion ← previous; previous ← the champion before that one per the ledger (or none). See module doc."""

    model_name: str
    reason: str = ""
    ledger_uri: str | None = None
    tracking_uri: str | None = None

    def run(self) -> AliasMoveResult:
        """Move the aliases, tag the demoted version `rolled_back`, record a `rollback` ledger line."""
        with registry.tracking_errors(self.tracking_uri):
            return self._run()

    def _run(self) -> AliasMoveResult:
        name, tracking = self.model_name, self.tracking_uri
        ledger = Ledger(self.ledger_uri)
        ledger.check()
        c = registry.client(tracking)
        repair(name, ledger, tracking)
        now = aliases(name, tracking)
        bad, target = now.get(CHAMPION), now.get(PREVIOUS)
        if target is None:
            raise DataError(f"{name} has no 'previous' version to roll back to; nothing was moved",
                            "promote a version by hand instead (`recsys promote --model-version N --reason ...`)")
        new_previous, deleted = _predecessor(name, target, {v for v in (bad, target) if v}, ledger, tracking)
        warning = None
        if deleted:
            warning = (f"ledger predecessor(s) {', '.join(deleted)} of version {target} no longer exist in the "
                       "registry: " + (f"previous is now {new_previous}" if new_previous else "previous left empty"))
            log.warning(warning)
        entries: list[dict[str, Any]] = []
        move_aliases(name, {PREVIOUS: new_previous, CHAMPION: target}, tracking,
                     expect={CHAMPION: bad, PREVIOUS: target},
                     record=lambda: entries.append(ledger.append(
                         {"event": "rollback", "model": name, "version": target, "champion_before": bad,
                          "champion_after": target, "previous_after": new_previous,
                          "reason": self.reason or "manual rollback"} | ({"warning": warning} if warning else {}))))
        if bad is not None:
            c.set_model_version_tag(name, bad, "rolled_back", utc_now())
        return _result(entries[0], previous_after=new_previous)


def _result(entry: dict[str, Any], previous_after: str | None) -> AliasMoveResult:
    return AliasMoveResult(model_name=entry["model"], event=entry["event"], version=entry["version"],
                           champion_before=entry["champion_before"], champion_after=entry["champion_after"],
                           previous_after=previous_after, warning=entry.get("warning"))


def _version_or_none(v: Any) -> str | None:
    try:
        return registry.canonical_version(v)
    except DataError:
        return None  # no version (None) or an unreadable ledger value: not a rollback target


def _predecessor(name: str, target: str, skip: set[str], ledger: Ledger,
                 tracking: str | None) -> tuple[str | None, list[str]]:
    """The champion before `target` per the ledger's promotions, walking further back past versions deleted
    from the registry; (version or None, the deleted versions passed over)."""
    want = target
    deleted: list[str] = []
    for e in reversed(ledger.read()):
        if e.get("model") != name or e.get("event") not in ("promotion", "manual-promotion") or \
                _version_or_none(e.get("champion_after")) != want:
            continue
        older = _version_or_none(e.get("champion_before"))
        if older is None or older in skip:
            break
        if registry.version_exists(name, older, tracking):
            return older, deleted
        deleted.append(older)
        want = older  # deleted: its own predecessor is the next rollback target
    return None, deleted
