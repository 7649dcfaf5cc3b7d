"""Offline metric gates a candidate must pass before it becomes `champion`: the gate's rules and its result
types (pure checks, no I/O but the YAML read). The job that applies them is pipeline.training.gate.GateJob.

Every metric is measured on the candidate's snapshot test users (strong generalization: fold-in → targets).
Gates, each recorded as pass / fail / skipped with a one-line detail:

- floor.<metric>       absolute floors, e.g. NDCG@100 >= 0.05
- champion.<metric>    no metric worse than the champion re-scored on the same users, within a relative
                       tolerance: candidate >= champion * (1 - champion_tolerance).
                       FIRST MODEL EVER (no champion alias): skipped, detail "no champion: skipped"; the other
                       gates still apply, so a first model must still clear floors, baselines, coverage, sanity.
- baseline.popularity  primary metric >= popularity * (1 + popularity_margin)  (must beat it)
- baseline.ease        primary metric >= EASE * (1 - ease_margin)             (may trail it, within the margin);
                       skipped when the training job skipped EASE (catalog > max_ease_items)
                       NO BASELINES AT ALL (trained with `baselines: false`): both baseline gates FAIL (closed),
                       since a first model would otherwise only need the absolute floors; the gate config's
                       `allow_missing_baselines: true` turns them into `skipped`. The detail says which applied.
- coverage             coverage@top_n >= coverage_floor
- sanity.nan / sanity.seen   no non-finite score; no fold-in (already seen) item in any top-N list
- ablation.pia         a PIA model's primary metric >= its no-PIA twin's * (1 - ablation_tolerance), both on the
                       snapshot's test users (the twin was scored by training on the same users: its
                       `compare.<twin>.test.*` version tags). WARNS BY DEFAULT (status `warn`, which does not
                       block; `ablation_blocks: true` makes it `fail`): the twin is not registered, so blocking
                       would keep last week's champion rather than ship the better twin, and the champion gates
                       already stop a model worse than what serves. The detail says "PIA hurt this week" with
                       the two numbers. Skipped for a model without PIA, or when no twin was trained
                       (compare_base: false).
- latent.<name>        OFF BY DEFAULT (empty `latent_floors`): a floor on the version's latent diagnostics, read
                       from its training run's `diag.*` metrics (pipeline.training.diagnose): `active_units`
                       (count), `active_share` (of the latent units) or `kl_mean` (nats per user), e.g.
                       `latent_floors: {active_units: 20, kl_mean: 1.0}` fails a collapsing model. A version
                       without the metric fails closed (trained with `diagnose: false`: run `recsys diagnose`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.errors import DataError
from pipeline.job import JobResult

Status = Literal["pass", "fail", "skipped", "warn"]  # only `fail` blocks; `warn` is a failed check marked warn-only
# What the gate measures (pipeline.training.rescore, model.evaluate's default cut-offs; training records the same
# as baseline tags): a metric outside this list has no value to compare.
KNOWN_METRICS = ("recall@20", "recall@50", "ndcg@100")
# The latent diagnostics a floor can be set on (model.diagnostics, logged as `diag.<name>` on the training run).
LATENT_METRICS = ("active_units", "active_share", "kl_mean")


class GateConfig(BaseModel):
    """The thresholds of every gate (a YAML file of these keys: `recsys gate --config`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    metrics: tuple[str, ...] = ("recall@20", "recall@50", "ndcg@100")
    primary: str = "ndcg@100"
    floors: dict[str, float] = Field(default_factory=lambda: {"ndcg@100": 0.05})
    champion_tolerance: float = Field(0.02, description="relative: each metric >= champion * (1 - tolerance)")
    popularity_margin: float = Field(0.05, description="relative: primary >= popularity * (1 + margin)")
    ease_margin: float = Field(0.15, description="relative: primary >= EASE * (1 - margin)")
    coverage_floor: float = Field(0.05, ge=0.0, le=1.0, description="catalog share in anyone's top-N")
    top_n: int = Field(20, ge=1, description="N of the coverage and sanity checks")
    sanity_users: int = Field(5000, ge=1, description="test users whose top-N lists are checked for seen items")
    allow_missing_baselines: bool = Field(False, description="no baselines recorded (baselines: false): skip, not fail")
    ablation_tolerance: float = Field(0.02, ge=0.0, lt=1.0,
                                      description="relative: a PIA model's primary >= its no-PIA twin's * (1 - "
                                                  "tolerance); 0.02 as champion_tolerance (the noise accepted "
                                                  "for 'not worse')")
    ablation_blocks: bool = Field(False, description="a PIA model worse than its twin fails the gate (true) or only "
                                                     "warns (false, default: see the module doc)")
    latent_floors: dict[str, float] = Field(default_factory=dict,
                                            description="floors on the diagnostics (active_units, active_share, "
                                                        "kl_mean); empty: the latent gate is off")

    @field_validator("latent_floors")
    @classmethod
    def _latent_known(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = [n for n in v if n not in LATENT_METRICS]
        if unknown:
            raise ValueError(f"unknown latent floor(s) {', '.join(map(repr, unknown))}: use {', '.join(LATENT_METRICS)}")
        return v

    @field_validator("metrics", "primary")
    @classmethod
    def _measured(cls, v: str | tuple[str, ...]) -> str | tuple[str, ...]:
        """A metric the gate does not measure would be a KeyError at scoring time."""
        unknown = [n for n in ((v,) if isinstance(v, str) else v) if n not in KNOWN_METRICS]
        if unknown:
            raise ValueError(f"unknown gate metric(s) {', '.join(map(repr, unknown))}: the gate measures "
                             f"{', '.join(KNOWN_METRICS)}")
        return v

    @field_validator("floors")
    @classmethod
    def _measured_floors(cls, v: dict[str, float]) -> dict[str, float]:
        """A floor on a metric the gate does not measure would always fail (NaN)."""
        unknown = [n for n in v if n not in KNOWN_METRICS and not re.fullmatch(r"coverage@[1-9]\d*", n)]
        if unknown:
            raise ValueError(f"unknown gate metric(s) {', '.join(map(repr, unknown))}: floors can be set on "
                             f"{', '.join(KNOWN_METRICS)} and coverage@<top_n>")
        return v

    @model_validator(mode="after")
    def _coverage_floor_at_top_n(self) -> GateConfig:
        wrong = [n for n in self.floors if n.startswith("coverage@") and n != f"coverage@{self.top_n}"]
        if wrong:
            raise ValueError(f"floor {wrong[0]!r} is not measured: coverage is measured at top_n = {self.top_n}")
        return self


def load_gate_config(path: str | Path | None) -> GateConfig:
    """GateConfig from a YAML file (read with safe_load); the defaults when `path` is None. Any problem with the
    file (missing, not YAML, a YAML tag, not a mapping) is one DataError naming it; invalid or unknown keys raise
    pydantic's ValidationError, which the CLI renders as one line per field with its fix."""
    if path is None:
        return GateConfig()
    p = Path(path)
    data = read_yaml_mapping(p, "gate config", "GateConfig")
    return GateConfig(**data)  # a ValidationError: the CLI prints one line per field, with its fix


def read_yaml_mapping(p: Path, what: str, model: str) -> dict[str, Any]:
    """The `key: value` mapping in the YAML file `p` (safe_load: no Python tags), or one DataError naming the
    file and the fix. `what` ('gate config') and `model` (the pydantic class it feeds) are for the messages."""
    fix = f"write plain `key: value` YAML (keys of {model}; no `!!` tags)"
    if not p.is_file():
        raise DataError(f"{what} {p} not found", "pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(p.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as e:
        raise DataError(f"{what} {p} is not UTF-8 text", fix) from e
    except OSError as e:
        raise DataError(f"{what} {p} cannot be read ({e.strerror or e})", "check the file and its permissions") from e
    except yaml.YAMLError as e:
        if isinstance(e, yaml.constructor.ConstructorError) and "constructor for the tag" in str(e):
            # !!python/object and any other tag safe_load has no constructor for
            raise DataError(f"{what} {p} uses a YAML tag that is not allowed ({_yaml_problem(e)})", fix) from e
        raise DataError(f"{what} {p} is not valid YAML ({_yaml_problem(e)})", fix) from e
    if not isinstance(data, dict):
        raise DataError(f"{what} {p} is not a mapping", f"write `key: value` lines (see {model})")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise DataError(f"{what} {p} has non-text key(s) {', '.join(map(repr, bad[:3]))}", fix)
    return data


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in one line: what and where (line:column), without the echoed source lines."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    what = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"{' '.join(str(what).split())[:160]}{where}"


class GateCheck(BaseModel):
    """One gate's outcome: its name (e.g. 'floor.ndcg@100'), pass / fail / skipped, and a one-line detail."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    gate: str
    status: Status
    detail: str


class CandidateRow(BaseModel):
    """One candidate of a champion/challenger group (pipeline.training.candidates), as the gate report lists it:
    its version, family, primary metric on the gate's users, each gate's status, and whether it was promoted."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: str
    model: str
    primary: float
    verdicts: dict[str, Status]
    passed: bool
    promoted: bool
    note: str = ""


class GateResult(JobResult):
    """What GateJob returns (and the gate's XCom): the verdicts, the metrics compared, the report.

    `version` is canonical; `champion` is the champion's version at gate time (None: first model, or the
    candidate itself); `metrics` maps a column ('candidate v3', 'champion v2', 'baseline popularity', ...)
    to metric name → value; `warnings` are non-fatal problems (unverifiable snapshot, failed report upload).
    """

    model_name: str
    version: str
    passed: bool
    promoted: bool
    champion: str | None
    verdicts: list[GateCheck]
    metrics: dict[str, dict[str, float]]
    report: str = ""
    warnings: list[str] = Field(default_factory=list)
    html_report: str | None = None  # where gate_report.html was logged (None: not uploaded; see warnings)
    candidates: list[CandidateRow] = Field(default_factory=list)  # the group gated together (empty: gated alone)
    held: str | None = None  # why a passing version was not promoted (another candidate of its group was better)


class Ablation(BaseModel):
    """What the ablation gate compares: the candidate's family and its no-PIA twin's metrics on the gate's users
    (None: not applicable or not trained, `note` says which)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str
    twin: str | None = None
    twin_metrics: dict[str, float] | None = None
    users: int = 0  # the test users both were scored on
    note: str = ""


def ablation_of(model: str, tags: dict[str, str], users: int) -> Ablation:
    """The Ablation of a version from its tags (`model`, `compare.<twin>.test.<metric_key>`, as TrainJob writes them)."""
    if not model.endswith("-pia"):
        return Ablation(model=model, note=f"{model or 'the model'} has no PIA: no twin to compare")
    twin = model.removesuffix("-pia")
    prefix = f"compare.{twin}.test."
    vals = {k.removeprefix(prefix).replace("_at_", "@"): float(v) for k, v in tags.items() if k.startswith(prefix)}
    if not vals:
        return Ablation(model=model, twin=twin, note=f"no no-PIA twin ({twin}) was trained with this version "
                        "(compare_base: false, or registered before twins were tagged)")
    return Ablation(model=model, twin=twin, twin_metrics=vals, users=users)


def ablation_check(cfg: GateConfig, candidate: dict[str, float], ab: Ablation) -> GateCheck:
    """The ablation gate (see the module doc)."""
    p = cfg.primary
    if ab.twin_metrics is None or p not in ab.twin_metrics:
        return _verdict("ablation.pia", "skipped", ab.note or f"the twin has no {p}")
    value, twin = candidate.get(p, float("nan")), ab.twin_metrics[p]
    bound = twin * (1 - cfg.ablation_tolerance)
    where = f"on the snapshot's {ab.users} test users (twin scored by training on the same users)"
    if value == value and value >= bound:
        return _verdict("ablation.pia", "pass", f"{value:.4f} >= {bound:.4f} ({ab.model} {p} vs no-PIA twin {ab.twin} "
                        f"{twin:.4f}, tolerance {cfg.ablation_tolerance:g}, {where})")
    return _verdict("ablation.pia", "fail" if cfg.ablation_blocks else "warn",
                    f"PIA hurt this week: {ab.model} {p} {value:.4f} < no-PIA twin {ab.twin} {twin:.4f} * "
                    f"(1 - {cfg.ablation_tolerance:g}) = {bound:.4f}, {where}"
                    + ("" if cfg.ablation_blocks else "; warn-only (ablation_blocks: false)"))


def _verdict(gate: str, status: Status, detail: str) -> GateCheck:
    return GateCheck(gate=gate, status=status, detail=detail)


def _cmp(gate: str, value: float, bound: float, what: str) -> GateCheck:
    ok = value == value and value >= bound  # NaN fails
    return _verdict(gate, "pass" if ok else "fail", f"{value:.4f} {'>=' if ok else '<'} {bound:.4f} ({what})")


def check(cfg: GateConfig, candidate: dict[str, float], champion: dict[str, float] | None,
          baselines: dict[str, dict[str, float]], nan_rows: int, seen_hits: int,
          champion_note: str = "no champion: skipped", diagnostics: dict[str, float] | None = None,
          ablation: Ablation | None = None) -> list[GateCheck]:
    """All gates. `candidate`/`champion`/`baselines[name]` map metric names (e.g. 'ndcg@100') to values;
    `diagnostics`: the version's latent diagnostics (`diag.*` without the prefix), read when latent floors are set;
    `ablation`: the no-PIA twin's metrics (None: no ablation verdict at all)."""
    out = [_cmp(f"floor.{m}", candidate.get(m, float("nan")), v, "absolute floor") for m, v in cfg.floors.items()]
    for m in cfg.metrics:
        if champion is None:
            out.append(_verdict(f"champion.{m}", "skipped", champion_note))
        else:
            out.append(_cmp(f"champion.{m}", candidate[m], champion[m] * (1 - cfg.champion_tolerance),
                            f"champion {champion[m]:.4f}, tolerance {cfg.champion_tolerance:g}"))
    p = cfg.primary
    pop, ease = baselines.get("popularity"), baselines.get("ease")
    # Training fits popularity whenever baselines are on, so no popularity means `baselines: false`.
    none_status: Status = "skipped" if cfg.allow_missing_baselines else "fail"
    none_detail = "baselines were not computed at training (baselines: false); " + (
        "allowed by allow_missing_baselines: true" if cfg.allow_missing_baselines else
        "failing closed: retrain with baselines: true, or set allow_missing_baselines: true in the gate config")
    out.append(_verdict("baseline.popularity", none_status, none_detail) if pop is None else
               _cmp("baseline.popularity", candidate[p], pop[p] * (1 + cfg.popularity_margin),
                    f"popularity {pop[p]:.4f}, margin +{cfg.popularity_margin:g}"))
    out.append(_cmp("baseline.ease", candidate[p], ease[p] * (1 - cfg.ease_margin),
                    f"EASE {ease[p]:.4f}, margin -{cfg.ease_margin:g}") if ease is not None else
               _verdict("baseline.ease", none_status, none_detail) if pop is None else
               _verdict("baseline.ease", "skipped", "no EASE baseline recorded (catalog above max_ease_items)"))
    cov = f"coverage@{cfg.top_n}"
    out.append(_cmp("coverage", candidate.get(cov, float("nan")), cfg.coverage_floor, cov))
    out.append(_verdict("sanity.nan", "pass" if nan_rows == 0 else "fail", f"{nan_rows} users with non-finite scores"))
    out.append(_verdict("sanity.seen", "pass" if seen_hits == 0 else "fail",
                        f"{seen_hits} already-seen items in top-{cfg.top_n} lists"))
    if ablation is not None:
        out.append(ablation_check(cfg, candidate, ablation))
    return out + latent_checks(cfg, diagnostics or {})


def latent_checks(cfg: GateConfig, diagnostics: dict[str, float]) -> list[GateCheck]:
    """The latent gate (none when `latent_floors` is empty): each floor passes when the diagnostic is at or above
    it; a missing diagnostic fails closed."""
    out = []
    for name, floor in cfg.latent_floors.items():
        if name not in diagnostics:
            out.append(_verdict(f"latent.{name}", "fail", f"no diag.{name} metric on the version's run: retrain with "
                                "diagnose: true or run `recsys diagnose --model models:/NAME/VERSION` first"))
        else:
            out.append(_cmp(f"latent.{name}", diagnostics[name], floor, "latent floor (collapse)"))
    return out


def passed(results: list[GateCheck]) -> bool:
    """True when no gate failed (skipped gates do not fail)."""
    return all(r.status != "fail" for r in results)
