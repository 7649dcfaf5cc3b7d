"""`recsys gate | promote | rollback`: move the `champion` alias, safely, and record why.

Aliases: `challenger` = newest trained version (set by the training job); `champion` = what inference
serves; `previous` = the champion before it (the rollback target).

Interruption safety. Moving aliases is two MLflow calls (previous, then champion), not a transaction. Before
the first call an intent record (registered-model tag `recsys.alias_txn`: the aliases before and after) is
written; after the last call it is deleted. Champion is always moved LAST, so a crash in between never
serves an unvetted model. Every command that moves aliases first looks for a left-over intent older than
TXN_STALE_S and repairs it by restoring the "before" aliases (always safe: the old champion was vetted),
recording a `repair` event; the operator then re-runs the gate. A younger intent may be another command's
move in flight: it is left alone and a move refuses to start while any intent exists. A move also refuses
when the aliases differ from what its command read (`expect`): the gate scores for minutes, and must not
undo a rollback made meanwhile. The ledger line (and the gate's verdict tags) are written right after the
aliases moved, before anything optional (report, chart, metrics), which is best-effort.

Versions from outside (CLI, ledger, URIs) are canonical integers (registry.canonical_version): '02' is '2'.

Rollback: champion ← previous; previous ← the version that was champion before the restored one (read from
the ledger's promotion events), or no `previous` when the ledger has none. The demoted version never becomes
`previous` (it is tagged `rolled_back`), so a second rollback cannot re-serve the model just pulled.

Ledger: append-only JSON Lines (local path or s3:// via pipeline.lake; default RECSYS_HOME/promotion-ledger.jsonl,
or RECSYS_LEDGER). S3 has no append: the object is rewritten whole, which assumes one writer at a time (gate
runs are serialized by the DAG).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import registry
from pipeline.errors import DataError
from pipeline.gates import GateConfig, GateResult, check, passed
from pipeline.lake import resolve
from pipeline.registry import CHALLENGER, CHAMPION, PREVIOUS

TXN_TAG = "recsys.alias_txn"
# An alias move takes a few MLflow calls (seconds, or a couple of minutes of client retries); an intent older
# than this is one whose command died. Age, not process ownership: the command may run on another machine.
TXN_STALE_S = 600

log = logging.getLogger(__name__)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# -- ledger ---------------------------------------------------------------------------------------------------


def ledger_uri(explicit: str | None = None) -> str:
    return explicit or os.environ.get("RECSYS_LEDGER") or str(registry.recsys_home() / "promotion-ledger.jsonl")


class Ledger:
    def __init__(self, uri: str | None = None):
        self.loc = resolve(ledger_uri(uri))

    def append(self, event: dict[str, Any]) -> dict[str, Any]:
        line = json.dumps({"time": _now(), **event}, sort_keys=True, default=str) + "\n"
        if self.loc.uri.startswith("s3://"):
            old = self.loc.read_bytes() if self.loc.exists() else b""
            self.loc.write_bytes(old + line.encode())
        else:
            self.loc.mkdir_parent()
            with open(self.loc.path, "a", encoding="utf-8") as f:  # one write of one line: append-only
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        return json.loads(line)

    def read(self) -> list[dict[str, Any]]:
        if not self.loc.exists():
            return []
        return [json.loads(x) for x in self.loc.read_bytes().decode().splitlines() if x.strip()]


# -- aliases --------------------------------------------------------------------------------------------------


def _model(name: str, tracking: str | None) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return registry.client(tracking).get_registered_model(name)
    except MlflowException as e:
        raise DataError(f"no registered model {name!r}", "train one first (`recsys train`)") from e


def aliases(name: str, tracking: str | None = None) -> dict[str, str]:
    return {k: str(v) for k, v in _model(name, tracking).aliases.items()}


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

    `expect`: the aliases the caller's decision was based on; when any differs now, nothing moves.
    `_fail_after` (tests) raises after that many alias calls, to simulate a crash mid-move.
    """
    c = registry.client(tracking)
    model = _model(name, tracking)
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
    c.set_registered_model_tag(name, TXN_TAG, json.dumps({"before": before, "after": target, "time": _now()}))
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


# -- scoring on the candidate's test users --------------------------------------------------------------------


def _score_fn(bundle: Any, item_ids: np.ndarray) -> tuple[Any, bool]:
    """The bundle's score function over the snapshot's item columns (a champion may know other items:
    unknown fold-in items are dropped, items it cannot score get -inf, so it is never credited for them).
    Returns (score function, whether columns were remapped)."""
    import torch

    from model.sparse import SparseBatch

    rec = bundle.recommender
    if len(bundle.item_ids) == len(item_ids) and np.array_equal(bundle.item_ids.astype(str), item_ids.astype(str)):
        return rec.score, False
    index = bundle.item_index()
    s2b = torch.tensor([index.get(i, -1) for i in item_ids.tolist()], dtype=torch.int64)
    known = torch.nonzero(s2b >= 0).squeeze(1)

    def score(hist: SparseBatch) -> torch.Tensor:
        dev = hist.cols.device
        c = s2b.to(dev)[hist.cols]
        keep = c >= 0
        rows = hist.rows[keep]
        offsets = torch.searchsorted(rows, torch.arange(hist.n_rows, device=dev))
        b = SparseBatch(rows, c[keep], hist.vals[keep], offsets, hist.n_rows, bundle.n_items)
        out = rec.score(b).float()
        full = torch.full((hist.n_rows, len(item_ids)), -torch.inf, device=out.device)
        full[:, known.to(out.device)] = out[:, s2b[known].to(out.device)]
        return full

    return score, True


def rescore(bundle: Any, snap: Any, top_n: int) -> tuple[dict[str, float], int]:
    """Mean test metrics of a bundle on a snapshot's test users, and the number of users with non-finite scores."""
    import torch

    from model.evaluate import evaluate

    base, remapped = _score_fn(bundle, snap.item_ids)
    bad = [0]

    def counting(hist: Any) -> torch.Tensor:
        s = base(hist)
        ok = torch.isfinite(s) | torch.isneginf(s) if remapped else torch.isfinite(s)  # remapped: -inf = unknown item
        bad[0] += int((~ok.all(dim=1)).sum())
        return s

    res = evaluate(counting, snap.test.fold_in, snap.test.targets, device=bundle.recommender.device, coverage_k=top_n,
                   item_popularity=torch.as_tensor(snap.item_popularity()))
    out = res.mean()
    out[f"mean_popularity@{top_n}"] = res.mean_popularity
    return out, bad[0]


def seen_in_top(bundle: Any, snap: Any, k: int, max_users: int) -> int:
    """Already-seen (fold-in) items in the bundle's top-k lists, through the same recommend() inference uses."""
    x = snap.test.fold_in[:max_users]
    top, _ = bundle.recommend(x, k)
    rows = np.repeat(np.arange(top.shape[0]), top.shape[1])
    return int(np.asarray(x[rows, top.ravel()]).sum())


# -- gate ------------------------------------------------------------------------------------------------------


@dataclass
class GateOutcome:
    name: str
    version: str
    passed: bool
    promoted: bool
    results: list[GateResult]
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # candidate / champion / baselines
    champion: str | None = None
    report: str = ""
    warnings: list[str] = field(default_factory=list)


def _baselines(tags: dict[str, str], metrics: tuple[str, ...], top_n: int) -> dict[str, dict[str, float]]:
    from pipeline.train_job import metric_key

    out: dict[str, dict[str, float]] = {}
    for name in ("popularity", "ease"):
        vals = {m: float(tags[f"baseline.{name}.{metric_key(m)}"]) for m in (*metrics, f"coverage@{top_n}")
                if f"baseline.{name}.{metric_key(m)}" in tags}
        if vals:
            out[name] = vals
    return out


def report_markdown(o: GateOutcome, cfg: GateConfig, mode: str) -> str:
    cols = list(o.metrics)
    metric_names = [*cfg.metrics, f"coverage@{cfg.top_n}"]
    lines = [f"# Gate report: {o.name} version {o.version}", "",
             f"- mode: {mode}; verdict: **{'passed' if o.passed else 'failed'}**; promoted: {o.promoted}",
             f"- champion at gate time: {o.champion or 'none (first model: champion gates skipped)'}",
             "- missing baselines (trained with baselines: false) "
             + ("are skipped (allow_missing_baselines: true)" if cfg.allow_missing_baselines else
                "fail the gate (allow_missing_baselines: false)"),
             *(f"- warning: {w}" for w in o.warnings), "",
             "| gate | status | detail |", "|---|---|---|"]
    lines += [f"| {r.gate} | {r.status} | {r.detail} |" for r in o.results]
    lines += ["", "| metric | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for m in metric_names:
        lines.append(f"| {m} | " + " | ".join(f"{o.metrics[c][m]:.4f}" if m in o.metrics[c] else "-" for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _check_snapshot(name: str, version: str, tags: dict[str, str], snap: Any) -> str | None:
    """Refuse a snapshot rebuilt since training (users may have been split differently: the candidate's
    training users could now be test users); returns a warning for versions that predate the digest tag."""
    from pipeline.train_job import registry_digest

    want = tags.get("snapshot_digest")
    if want is None:
        return (f"{name} version {version} has no snapshot_digest tag (registered before digests): "
                f"cannot verify {tags['snapshot_uri']} is the build it was trained on")
    got = registry_digest(snap.manifest)
    if got != want:
        raise DataError(f"snapshot {tags['snapshot_uri']} was rebuilt since {name} version {version} was trained "
                        f"(digest {got}, trained on {want}): its test users may have been training users; "
                        "nothing was moved", "retrain on the current snapshot, or gate against the build it was "
                        "trained on")
    return None


def gate(name: str, version: str, *, mode: str = "enabled", cfg: GateConfig | None = None,
         ledger_uri: str | None = None, tracking: str | None = None) -> GateOutcome:
    """Score the candidate (and the champion, re-scored on the candidate's test users), check the gates,
    record the verdict (version tags, ledger; report on the candidate's run, best-effort) and, when enabled and
    passed, promote: previous ← old champion, champion ← candidate (refused if the aliases moved meanwhile)."""
    from pipeline.snapshot import load_snapshot

    if mode not in ("enabled", "dry-run"):
        raise ValueError(f"unknown gate mode {mode!r}: use enabled or dry-run")
    cfg = cfg or GateConfig()
    version = registry.canonical_version(version)
    ledger = Ledger(ledger_uri)
    c = registry.client(tracking)
    if mode == "enabled":
        repair(name, ledger, tracking)
    try:
        tags = dict(c.get_model_version(name, version).tags)
    except Exception as e:
        raise DataError(f"no version {version} of registered model {name!r}", "check --model/--version") from e
    if "snapshot_uri" not in tags:
        raise DataError(f"{name} version {version} has no snapshot_uri tag", "gate versions registered by `recsys train`")
    snap = load_snapshot(tags["snapshot_uri"])
    warn = _check_snapshot(name, version, tags, snap)
    if warn:
        log.warning(warn)
    read = aliases(name, tracking)  # the verdict is relative to these; the move refuses if they change
    cand_bundle, _ = registry.load_bundle(f"models:/{name}/{version}", tracking=tracking)
    cand, nan_rows = rescore(cand_bundle, snap, cfg.top_n)
    seen = seen_in_top(cand_bundle, snap, cfg.top_n, cfg.sanity_users)
    champ_v = read.get(CHAMPION)
    champ: dict[str, float] | None = None
    note = "no champion: skipped"
    if champ_v == version:
        champ_v, note = None, "candidate is the champion: skipped"
    elif champ_v is not None:
        champ_bundle, _ = registry.load_bundle(f"models:/{name}/{champ_v}", tracking=tracking)
        champ, _ = rescore(champ_bundle, snap, cfg.top_n)
    baselines = _baselines(tags, cfg.metrics, cfg.top_n)
    results = check(cfg, cand, champ, baselines, nan_rows, seen, champion_note=note)
    ok = passed(results)
    table = {f"candidate v{version}": cand} | ({f"champion v{champ_v}": champ} if champ is not None else {}) | \
        {f"baseline {k}": v for k, v in baselines.items()}
    outcome = GateOutcome(name, version, ok, False, results, table, champ_v, warnings=[warn] if warn else [])

    if mode == "enabled" and ok:
        move_aliases(name, {PREVIOUS: champ_v if champ_v is not None else read.get(PREVIOUS), CHAMPION: version},
                     tracking, expect={CHAMPION: read.get(CHAMPION), PREVIOUS: read.get(PREVIOUS)})
        outcome.promoted = True

    # -- the record, right after the move: version tags and ledger line ---------------------------------
    failed = [r.gate for r in results if r.status == "fail"]
    vtags = {"gate.verdict": "passed" if ok else "failed", "gate.mode": mode, "gate.time": _now(),
             "gate.failed": ",".join(failed) or "-", "gate.champion_version": champ_v or "none"}
    vtags |= {f"gate.{r.gate.replace('@', '_at_')}": r.status for r in results}
    for k, tag in vtags.items():
        c.set_model_version_tag(name, version, k, tag)
    if mode == "enabled":
        ledger.append({"event": "promotion" if ok else "rejection", "model": name, "version": version,
                       "champion_before": champ_v, "champion_after": version if ok else champ_v,
                       "metrics": {k: {m: round(x, 6) for m, x in v.items() if np.isfinite(x)} for k, v in table.items()},
                       "reason": "all gates passed" if ok else "failed: " + ", ".join(failed)})
    if outcome.promoted and aliases(name, tracking).get(CHALLENGER) == version:
        c.delete_registered_model_alias(name, CHALLENGER)  # it is no longer a challenger
    outcome.report = report_markdown(outcome, cfg, mode)
    if tags.get("run_id"):
        _log_gate_run(outcome, cfg, mode, tags["run_id"], cand, champ, tracking)
    return outcome


def _log_gate_run(o: GateOutcome, cfg: GateConfig, mode: str, run_id: str, cand: dict[str, float],
                  champ: dict[str, float] | None, tracking: str | None) -> None:
    """Report, chart and metrics on the candidate's run: best-effort, each step on its own (the verdict and
    the ledger line are already recorded, so a failed upload must not turn into a failed gate)."""
    from mlflow.entities import Metric

    from pipeline import plots
    from pipeline.train_job import metric_key

    c = registry.client(tracking)
    stamp = int(datetime.now(UTC).timestamp() * 1000)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)

        def report() -> None:
            (d / "gate_report.md").write_text(o.report)
            c.log_artifact(run_id, str(d / "gate_report.md"), f"gate/{mode}")

        def chart() -> None:
            plots.gate_chart(o.metrics, [*cfg.metrics, f"coverage@{cfg.top_n}"], d / "gate_chart.png")
            c.log_artifact(run_id, str(d / "gate_chart.png"), f"gate/{mode}")

        def metrics() -> None:
            c.log_batch(run_id, metrics=[Metric(f"gate.{label}.{metric_key(m)}", float(x), stamp, 0)
                                         for label, vals in (("candidate", cand), ("champion", champ or {}))
                                         for m, x in vals.items() if np.isfinite(x)])

        for what, step in (("report upload", report), ("chart", chart), ("metric batch", metrics)):
            try:
                step()
            except Exception as e:
                msg = f"gate {o.name} version {o.version}: {what} on run {run_id} failed ({type(e).__name__}: {e}); " \
                    "the verdict and the ledger line are recorded"
                log.warning(msg)
                o.warnings.append(msg)


# -- manual promotion and rollback -----------------------------------------------------------------------------


def promote(name: str, version: str, reason: str, *, ledger_uri: str | None = None,
            tracking: str | None = None) -> dict[str, Any]:
    """Manual override: champion ← version (previous ← old champion), no gates; recorded with the reason."""
    if not reason.strip():
        raise ValueError("a manual promotion needs --reason")
    version = registry.canonical_version(version)
    ledger = Ledger(ledger_uri)
    c = registry.client(tracking)
    repair(name, ledger, tracking)
    try:
        c.get_model_version(name, version)
    except Exception as e:
        raise DataError(f"no version {version} of registered model {name!r}", "check --model/--version") from e
    now = aliases(name, tracking)
    old = now.get(CHAMPION)
    if old == version:
        raise DataError(f"{name} version {version} is already the champion; nothing was moved",
                        "pick another version, or `recsys rollback` to serve `previous`")
    move_aliases(name, {PREVIOUS: old if old is not None else now.get(PREVIOUS), CHAMPION: version}, tracking,
                 expect={CHAMPION: old, PREVIOUS: now.get(PREVIOUS)})
    c.set_model_version_tag(name, version, "gate.verdict", "manual override")
    c.set_model_version_tag(name, version, "gate.override_reason", reason)
    return ledger.append({"event": "manual-promotion", "model": name, "version": version, "champion_before": old,
                          "champion_after": version, "reason": reason})


def _version_or_none(v: Any) -> str | None:
    try:
        return registry.canonical_version(v)
    except DataError:
        return None  # no version (None) or an unreadable ledger value: not a rollback target


def _predecessor(name: str, target: str, skip: set[str], ledger: Ledger, tracking: str | None) -> tuple[str | None, list[str]]:
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


def rollback(name: str, *, reason: str = "", ledger_uri: str | None = None, tracking: str | None = None) -> dict[str, Any]:
    """champion ← previous; previous ← the champion before that one per the ledger (or none). See module doc."""
    ledger = Ledger(ledger_uri)
    c = registry.client(tracking)
    repair(name, ledger, tracking)
    now = aliases(name, tracking)
    bad, target = now.get(CHAMPION), now.get(PREVIOUS)
    if target is None:
        raise ValueError(f"{name} has no 'previous' version to roll back to")
    new_previous, deleted = _predecessor(name, target, {v for v in (bad, target) if v}, ledger, tracking)
    warning = None
    if deleted:
        warning = (f"ledger predecessor(s) {', '.join(deleted)} of version {target} no longer exist in the registry: "
                   + (f"previous is now {new_previous}" if new_previous else "previous left empty"))
        log.warning(warning)
    move_aliases(name, {PREVIOUS: new_previous, CHAMPION: target}, tracking, expect={CHAMPION: bad, PREVIOUS: target})
    if bad is not None:
        c.set_model_version_tag(name, bad, "rolled_back", _now())
    return ledger.append({"event": "rollback", "model": name, "version": target, "champion_before": bad,
                          "champion_after": target, "previous_after": new_previous,
                          "reason": reason or "manual rollback"} | ({"warning": warning} if warning else {}))
