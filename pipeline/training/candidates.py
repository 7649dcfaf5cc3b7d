"""`recsys train-candidates`: champion/challenger across model families. CandidatesJob trains a list of candidate
TrainJob configurations on one snapshot, one after another, each registered as a version of the same registered
model (tagged `candidates.group`, `candidates.index`), then gates them on the same held-out test users and promotes
the best one (by the gate's primary metric) that passes every gate. The others stay registered, not champion.

Order of effects:
1. every candidate's configuration is validated on construction, and a closed-form candidate's dense memory
   (max_dense_bytes) is checked against the snapshot's catalog before anything trains: bad input registers nothing;
2. the candidates train and register in the listed order (a failed one stops the job: the versions already
   registered stay `challenger` with `gate.verdict: pending`, nothing is promoted);
3. every version is assessed (GateJob.assess: same users, same champion, no effect), the winner chosen;
4. the others are gated first (enabled mode: a `rejection` ledger line; a passing one records why it was held),
   the winner last, so each is compared with the champion the assessment saw; only the winner's gate moves
   `champion`. Each gate report lists every candidate side by side.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.errors import DataError
from pipeline.io import registry
from pipeline.job import Job, JobResult
from pipeline.training import DEFAULT_REGISTERED_NAME
from pipeline.training.gates import CandidateRow, GateCheck, GateConfig, read_yaml_mapping
from pipeline.training.train_job import TrainJob

# Keys every candidate shares (set on CandidatesJob, not per candidate): one snapshot, one registered model.
SHARED = ("snapshot", "registered_name", "experiment", "tracking_uri")
GROUP_TAG = "candidates.group"


class CandidateOutcome(BaseModel):
    """One candidate: its registered version, family, training run, its metrics on the gate's users, verdicts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    index: int
    version: str
    model: str
    run_id: str
    primary: float
    metrics: dict[str, float]
    verdicts: list[GateCheck]
    passed: bool
    promoted: bool
    held: str | None = None
    html_report: str | None = None


class CandidatesResult(JobResult):
    """Every candidate with its verdicts and metrics; `promoted`: the version made champion (None: none passed, or
    dry-run); `champion`: the champion after the job."""

    model_name: str
    group: str
    primary: str
    promoted: str | None
    champion: str | None
    candidates: list[CandidateOutcome]


class CandidatesJob(Job):
    """Train the candidates on one snapshot and promote the best that passes (see module doc). `candidates`: TrainJob
    keys per candidate (nested vae/pia/ease as in a train config), over `common`; the SHARED keys are this job's."""

    snapshot: str = Field(description="snapshot URI every candidate trains on (local path or s3://)")
    candidates: tuple[dict[str, Any], ...] = Field(({"model": "multivae-pia"},), min_length=1)
    common: dict[str, Any] = Field(default_factory=dict, description="TrainJob keys of every candidate")
    registered_name: str = DEFAULT_REGISTERED_NAME
    experiment: str = registry.DEFAULT_EXPERIMENT
    tracking_uri: str | None = None
    mode: Literal["enabled", "dry-run"] = "enabled"
    gates: GateConfig = GateConfig()
    ledger_uri: str | None = None
    group: str | None = Field(None, pattern=r"^[A-Za-z0-9._-]{1,64}$", description="the candidates.group tag "
                              "(default: a fresh id per run)")

    @model_validator(mode="after")
    def _valid_candidates(self) -> CandidatesJob:
        for i, c in enumerate((self.common, *self.candidates)):
            shared = [k for k in SHARED if k in c]
            if shared:
                where = "common" if i == 0 else f"candidate {i - 1}"
                raise ValueError(f"{where} sets {', '.join(shared)}: shared by all candidates, set on the job itself")
        self.train_jobs("check")  # each candidate a valid TrainJob (a ValidationError naming the field otherwise)
        return self

    def train_jobs(self, group: str) -> list[TrainJob]:
        """The candidates' TrainJobs, tagged with the group."""
        shared = {"snapshot": self.snapshot, "registered_name": self.registered_name, "experiment": self.experiment,
                  "tracking_uri": self.tracking_uri}
        out = []
        for i, c in enumerate(self.candidates):
            tags = {**self.common.get("tags", {}), **c.get("tags", {}), GROUP_TAG: group, "candidates.index": str(i)}
            out.append(TrainJob(**(self.common | c | shared | {"tags": tags})))
        return out

    def run(self) -> CandidatesResult:
        """Train, assess, gate, promote the best passing candidate (see module doc)."""
        group = self.group or uuid.uuid4().hex[:12]
        jobs = self.train_jobs(group)
        _check_budgets(self.snapshot, jobs)
        trained = [job.run() for job in jobs]
        with registry.tracking_errors(self.tracking_uri):
            return self._gate(group, [t.version for t in trained], [t.run_id for t in trained])

    def _gate(self, group: str, versions: list[str], run_ids: list[str]) -> CandidatesResult:
        from pipeline.training.aliases import aliases, repair
        from pipeline.training.gate import GateJob
        from pipeline.training.ledger import Ledger

        name, p = self.registered_name, self.gates.primary
        if self.mode == "enabled":  # as GateJob does first: the assessment must see repaired aliases
            ledger = Ledger(self.ledger_uri)
            ledger.check()
            repair(name, ledger, self.tracking_uri)

        def gate_job(version: str, **kw: Any) -> GateJob:
            return GateJob(model_name=name, version=version, mode=self.mode, gates=self.gates,
                           ledger_uri=self.ledger_uri, tracking_uri=self.tracking_uri, **kw)

        assessed = [gate_job(v).assess() for v in versions]
        primary = [a.scores.candidate.get(p, float("nan")) for a in assessed]
        passing = [i for i, a in enumerate(assessed) if a.passed and primary[i] == primary[i]]
        best = max(passing, key=lambda i: (primary[i], -i)) if passing else None  # ties: the earlier candidate
        holds = [None if i == best else _hold_reason(i, best, assessed, primary, p, group) for i in range(len(versions))]
        rows = tuple(CandidateRow(version=a.version, model=a.model, primary=primary[i],
                                  verdicts={v.gate: v.status for v in a.verdicts}, passed=a.passed,
                                  promoted=i == best and self.mode == "enabled", note=holds[i] or "")
                     for i, a in enumerate(assessed))
        order = [i for i in range(len(versions)) if i != best] + ([best] if best is not None else [])
        results = {i: gate_job(versions[i], hold=holds[i], candidates=rows).run() for i in order}
        outcomes = [CandidateOutcome(index=i, version=r.version, model=assessed[i].model, run_id=run_ids[i],
                                     primary=primary[i], metrics=assessed[i].scores.candidate, verdicts=r.verdicts,
                                     passed=r.passed, promoted=r.promoted, held=r.held, html_report=r.html_report)
                    for i, r in sorted(results.items())]
        promoted = next((o.version for o in outcomes if o.promoted), None)
        return CandidatesResult(model_name=name, group=group, primary=p, promoted=promoted,
                                champion=aliases(name, self.tracking_uri).get(registry.CHAMPION), candidates=outcomes)


def _hold_reason(i: int, best: int | None, assessed: list[Any], primary: list[float], p: str, group: str) -> str:
    """Why candidate i is not promoted (it failed a gate, or a better candidate passed)."""
    if not assessed[i].passed:
        failed = [v.gate for v in assessed[i].verdicts if v.status == "fail"]
        return f"failed {', '.join(failed)}"
    if best is None:  # passed but its primary is NaN (cannot be ranked)
        return f"{p} is not a number"
    b = assessed[best]
    return f"candidate v{b.version} ({b.model}) of group {group} passed with a better {p} ({primary[best]:.4f} vs " \
        f"{primary[i]:.4f})"


def _check_budgets(snapshot: str, jobs: list[TrainJob]) -> None:
    """Every closed-form candidate within its dense memory budget, before any candidate trains."""
    if not any(j.closed_form for j in jobs):
        return
    from model.train import resolve_device
    from pipeline.io.snapshot import read_manifest

    items = read_manifest(snapshot).get("counts", {}).get("items")
    if not isinstance(items, int):
        from pipeline.io.snapshot import load_snapshot

        items = load_snapshot(snapshot).n_items
    for j in jobs:
        j.check_budget(items, str(resolve_device(j.device)))


def load_candidates(path: str | Path | None, overrides: dict[str, Any] | None = None) -> CandidatesJob:
    """A CandidatesJob from a YAML file of its keys (`gates` nested, or a gate config file passed in overrides as
    `gates_file`), with `overrides` (CLI flags, the scheduler's settings; None means not given) over it; an override
    `common` (e.g. the settings' device) is merged into the file's `common`."""
    from pipeline.training.gates import load_gate_config

    data: dict[str, Any] = read_yaml_mapping(Path(path), "candidates config", "CandidatesJob") if path else {}
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    gates_file = given.pop("gates_file", None)
    if "common" in given:
        data["common"] = {**(data.get("common") or {}), **given.pop("common")}
    if gates_file is not None:
        data["gates"] = load_gate_config(gates_file)
    if not isinstance(data.get("candidates", []), list | tuple):
        raise DataError(f"candidates config {path}: `candidates` is not a list", "write `candidates:` as a YAML list "
                        "of TrainJob keys, e.g. `- {model: multivae-pia}`")
    return CandidatesJob(**(data | given))
