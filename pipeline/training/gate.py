"""`recsys gate`: GateJob scores a registered candidate against the champion, checks the gates
(pipeline.training.gates), records the verdict and, when enabled and passed, promotes it.

Steps of `GateJob.run()`, in this order:

1. check the ledger reads back and can be written, and repair an interrupted alias move (enabled mode only;
   pipeline.training.aliases);
2. load the snapshot the candidate was trained on, refusing one rebuilt since training (its `snapshot_digest`
   tag; versions registered before digests are gated with a warning);
3. score the candidate and the champion, re-scored on the candidate's test users (pipeline.training.rescore);
   the baselines' test metrics come from the candidate's version tags (training fitted them on the same split);
4. check every gate; when enabled and passed, move the aliases: previous ← old champion, champion ← candidate,
   refused when the aliases changed since step 3 (e.g. a rollback meanwhile), with its `promotion` ledger line
   written inside the move (the move is undone when the line cannot be written);
5. the record: (enabled mode, rejected) one `rejection` ledger line; then the `gate.*` version tags; a promoted
   candidate loses its `challenger` alias;
6. best-effort: the report, chart, metrics and HTML report on the candidate's run (pipeline.training.gate_report).

Dry-run mode does 2, 3, 4 (without moving anything), the version tags and 6: no repair, no ledger line.
Versions are canonical integers (registry.canonical_version): '02' is gated as '2'. MLflow errors are one
redacted DataError line (registry.tracking_errors).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from pipeline.errors import DataError
from pipeline.io import registry
from pipeline.io.registry import CHALLENGER, CHAMPION, PREVIOUS
from pipeline.job import Job
from pipeline.training.aliases import aliases, move_aliases, repair
from pipeline.training.diagnose import run_metrics
from pipeline.training.gate_report import log_gate_run, report_markdown
from pipeline.training.gates import CandidateRow, GateCheck, GateConfig, GateResult, ablation_of, check, passed
from pipeline.training.ledger import Ledger, utc_now
from pipeline.training.rescore import rescore, seen_in_top

__all__ = ["Assessment", "GateJob", "GateResult"]

log = logging.getLogger(__name__)


class GateJob(Job):
    """Gate one registered version (see module doc). `gates`: the thresholds (load_gate_config reads a YAML file).
    `hold` and `candidates` are set by CandidatesJob (pipeline.training.candidates) when a group is gated together:
    `hold` keeps a passing version from promotion (the reason is recorded: a better candidate passed), `candidates`
    are the group's rows for the report."""

    model_name: str
    version: str
    mode: Literal["enabled", "dry-run"] = "enabled"
    gates: GateConfig = GateConfig()
    ledger_uri: str | None = None
    tracking_uri: str | None = None
    hold: str | None = None
    candidates: tuple[CandidateRow, ...] = ()

    def run(self) -> GateResult:
        """Score, check, record and (enabled, passed) promote; raises DataError for a version it cannot gate."""
        with registry.tracking_errors(self.tracking_uri):
            return self._run()

    def assess(self) -> Assessment:
        """Steps 2 and 3 and the verdicts, with no effect (CandidatesJob compares a group with it before gating)."""
        with registry.tracking_errors(self.tracking_uri):
            return self._assess()

    def _assess(self) -> Assessment:
        name, tracking, cfg = self.model_name, self.tracking_uri, self.gates
        version = registry.canonical_version(self.version)
        tags = _version_tags(name, version, tracking)
        snap, warning = _trained_snapshot(name, version, tags)
        read = aliases(name, tracking)  # the verdict is relative to these; the move refuses if they change
        scores = _score(name, version, read.get(CHAMPION), snap, cfg, tracking)
        baselines = _baselines(tags, cfg.metrics, cfg.top_n)
        latent = run_metrics(tags.get("run_id"), tracking) if cfg.latent_floors else None  # the latent gate (off by default)
        ablation = ablation_of(tags.get("model", ""), _with_twin(tags, tracking), snap.test.n_users)
        verdicts = check(cfg, scores.candidate, scores.champion, baselines, scores.nan_rows, scores.seen,
                         champion_note=scores.note, diagnostics=latent, ablation=ablation)
        champ_v = scores.champion_version
        table = {f"candidate v{version}": scores.candidate} | \
            ({f"champion v{champ_v}": scores.champion} if scores.champion is not None else {}) | \
            ({f"no-PIA twin {ablation.twin}": ablation.twin_metrics} if ablation.twin_metrics else {}) | \
            {f"baseline {k}": v for k, v in baselines.items()}
        return Assessment(version, tags.get("model", ""), tags, read, scores, verdicts, passed(verdicts), table, warning)

    def _run(self) -> GateResult:
        name, tracking, cfg = self.model_name, self.tracking_uri, self.gates
        ledger = Ledger(self.ledger_uri)
        if self.mode == "enabled":
            ledger.check()
            repair(name, ledger, tracking)
        a = self._assess()
        version, read, scores, verdicts, ok, table = a.version, a.aliases, a.scores, a.verdicts, a.passed, a.table
        champ_v = scores.champion_version

        promoted = False
        if self.mode == "enabled":
            entry = _ledger_entry(name, version, ok, verdicts, champ_v, table, self.hold)
            if ok and self.hold is None:
                move_aliases(name, {PREVIOUS: champ_v if champ_v is not None else read.get(PREVIOUS), CHAMPION: version},
                             tracking, expect={CHAMPION: read.get(CHAMPION), PREVIOUS: read.get(PREVIOUS)},
                             record=lambda: ledger.append(entry))
                promoted = True
            else:
                ledger.append(entry)
        self._record(version, verdicts, ok, promoted, champ_v)

        rows = [r.model_copy(update={"promoted": promoted}) if r.version == version else r for r in self.candidates]
        result = GateResult(model_name=name, version=version, passed=ok, promoted=promoted, champion=champ_v,
                            verdicts=verdicts, metrics=table, warnings=[a.warning] if a.warning else [],
                            candidates=rows, held=self.hold if ok else None)
        result = result.model_copy(update={"report": report_markdown(result, cfg, self.mode)})
        if a.tags.get("run_id"):
            up = log_gate_run(result, cfg, self.mode, a.tags["run_id"], scores.candidate, scores.champion, tracking)
            result = result.model_copy(update={"warnings": [*result.warnings, *up.warnings], "html_report": up.html_uri})
        return result

    def _record(self, version: str, verdicts: list[GateCheck], ok: bool, promoted: bool, champ_v: str | None) -> None:
        """The verdict's record after the move and its ledger line: version tags, challenger alias."""
        name, tracking = self.model_name, self.tracking_uri
        c = registry.client(tracking)
        failed = [r.gate for r in verdicts if r.status == "fail"]
        vtags = {"gate.verdict": "passed" if ok else "failed", "gate.mode": self.mode, "gate.time": utc_now(),
                 "gate.failed": ",".join(failed) or "-", "gate.champion_version": champ_v or "none"}
        if ok and self.hold is not None:
            vtags["gate.held"] = self.hold[:500]
        vtags |= {f"gate.{r.gate.replace('@', '_at_')}": r.status for r in verdicts}
        for k, tag in vtags.items():
            c.set_model_version_tag(name, version, k, tag)
        if promoted and aliases(name, tracking).get(CHALLENGER) == version:
            c.delete_registered_model_alias(name, CHALLENGER)  # it is no longer a challenger


def _ledger_entry(name: str, version: str, ok: bool, verdicts: list[GateCheck], champ_v: str | None,
                  table: dict[str, dict[str, float]], hold: str | None = None) -> dict[str, Any]:
    """The gate's ledger line: `promotion` or `rejection` (also for a passing version held back, with why), with
    the metric table and the failed gates."""
    failed = [r.gate for r in verdicts if r.status == "fail"]
    promote = ok and hold is None
    reason = ("all gates passed" if promote else f"all gates passed; not promoted: {hold}" if ok else
              "failed: " + ", ".join(failed))
    return {"event": "promotion" if promote else "rejection", "model": name, "version": version,
            "champion_before": champ_v, "champion_after": version if promote else champ_v,
            "metrics": {k: {m: round(x, 6) for m, x in v.items() if np.isfinite(x)} for k, v in table.items()},
            "reason": reason}


def _with_twin(tags: dict[str, str], tracking: str | None) -> dict[str, str]:
    """The version's tags, with its twin's `compare.*.test.*` metrics read from the training run when the version
    predates twin tags (a PIA model trained with a twin logged them to its run)."""
    if not tags.get("model", "").endswith("-pia") or any(k.startswith("compare.") for k in tags) or not tags.get("run_id"):
        return tags
    try:
        metrics = registry.client(tracking).get_run(tags["run_id"]).data.metrics
    except Exception as e:  # the ablation is then skipped, with this reason
        log.warning("gate: the training run %s could not be read for the twin's metrics (%s)", tags["run_id"],
                    registry.secret_free(str(e)))
        return tags
    return tags | {k: str(v) for k, v in metrics.items()
                   if k.startswith("compare.") and ".test." in k and ".test.group." not in k}


@dataclass(frozen=True)
class _Scores:
    candidate: dict[str, float]
    nan_rows: int  # candidate's test users with non-finite scores
    seen: int  # already-seen items in the candidate's top-N lists
    champion_version: str | None  # None: no champion, or the candidate is the champion
    champion: dict[str, float] | None
    note: str  # the champion gates' detail when they are skipped


@dataclass(frozen=True)
class Assessment:
    """A version's verdicts before anything is recorded (GateJob.assess): what CandidatesJob compares."""

    version: str
    model: str  # the family (`model` tag), e.g. multivae-pia, ease
    tags: dict[str, str]
    aliases: dict[str, str]
    scores: _Scores
    verdicts: list[GateCheck]
    passed: bool
    table: dict[str, dict[str, float]]
    warning: str | None


def _version_tags(name: str, version: str, tracking: str | None) -> dict[str, str]:
    from mlflow.exceptions import MlflowException

    try:
        tags = dict(registry.client(tracking).get_model_version(name, version).tags)
    except MlflowException as e:
        failure = registry.server_failure(e, tracking)
        if failure is not None:
            raise failure from None
        raise DataError(f"no version {version} of registered model {name!r}; nothing was moved",
                        "check --model/--model-version") from None
    if "snapshot_uri" not in tags:
        raise DataError(f"{name} version {version} has no snapshot_uri tag", "gate versions registered by `recsys train`")
    return tags


def _trained_snapshot(name: str, version: str, tags: dict[str, str]) -> tuple[Any, str | None]:
    """The snapshot the version was trained on, and a warning when that cannot be verified (see _check_snapshot)."""
    from pipeline.io.snapshot import load_snapshot

    snap = load_snapshot(tags["snapshot_uri"])
    warning = _check_snapshot(name, version, tags, snap)
    if warning:
        log.warning(warning)
    return snap, warning


def _check_snapshot(name: str, version: str, tags: dict[str, str], snap: Any) -> str | None:
    """Refuse a snapshot rebuilt since training (users may have been split differently: the candidate's
    training users could now be test users); returns a warning for versions that predate the digest tag."""
    from pipeline.io.snapshot import manifest_digest

    want = tags.get("snapshot_digest")
    if want is None:
        return (f"{name} version {version} has no snapshot_digest tag (registered before digests): "
                f"cannot verify {tags['snapshot_uri']} is the build it was trained on")
    got = manifest_digest(snap.manifest)
    if got != want:
        raise DataError(f"snapshot {tags['snapshot_uri']} was rebuilt since {name} version {version} was trained "
                        f"(digest {got}, trained on {want}): its test users may have been training users; "
                        "nothing was moved", "retrain on the current snapshot, or gate against the build it was "
                        "trained on")
    return None


def _score(name: str, version: str, champ_v: str | None, snap: Any, cfg: GateConfig, tracking: str | None) -> _Scores:
    """The candidate's metrics and sanity counts, and the champion's metrics on the same test users."""
    cand_bundle, _ = registry.load_bundle(f"models:/{name}/{version}", tracking=tracking)
    cand, nan_rows = rescore(cand_bundle, snap, cfg.top_n)
    seen = seen_in_top(cand_bundle, snap, cfg.top_n, cfg.sanity_users)
    champ: dict[str, float] | None = None
    note = "no champion: skipped"
    if champ_v == version:
        champ_v, note = None, "candidate is the champion: skipped"
    elif champ_v is not None:
        champ_bundle, _ = registry.load_bundle(f"models:/{name}/{champ_v}", tracking=tracking)
        champ, _ = rescore(champ_bundle, snap, cfg.top_n)
    return _Scores(cand, nan_rows, seen, champ_v, champ, note)


def _baselines(tags: dict[str, str], metrics: tuple[str, ...], top_n: int) -> dict[str, dict[str, float]]:
    """The baselines' test metrics recorded by training as version tags `baseline.<name>.<metric_key>`."""
    from pipeline.training.evaluation import metric_key

    out: dict[str, dict[str, float]] = {}
    for name in ("popularity", "ease"):
        vals = {m: float(tags[f"baseline.{name}.{metric_key(m)}"]) for m in (*metrics, f"coverage@{top_n}")
                if f"baseline.{name}.{metric_key(m)}" in tags}
        if vals:
            out[name] = vals
    return out
