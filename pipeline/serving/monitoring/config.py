"""The thresholds of the daily output monitoring: `MonitorConfig`, a frozen pydantic model (InferJob.monitor), and
`load_monitor_config`, its YAML file (configs/monitor.yaml is the documented default).

A rule per metric, each threshold with its own action:

    rules:
      coverage:
        max_drop: {value: 0.8, action: block}   # fell by more than 80% since the previous published date
        max_drift: {value: 0.3, action: warn}   # |relative change| since the previous published date
      fallback_rate:
        max: {value: 0.5, action: block}        # absolute bounds: min / max
      gini: {max_drift: 0.2}                    # a bare number: action warn

`block`: nothing is committed (the date's previous output stays what readers see) and the job fails with a
DataError naming the metric, its value and the threshold. `warn`: logged, recorded in the manifest and on the
MLflow run. A metric with no value on a day (the first day has no previous date: no drift, no overlap) is not
checked. Every mistake (an unknown metric, min > max, a rate bound outside [0, 1], a drift <= 0) fails when the
config is built, before any scoring.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import DataError

Action = Literal["block", "warn"]

# name -> (kind, what it is). kind: "rate" (a share in [0, 1]), "count" (>= 0), "ratio" (>= 0), "score" (any real).
METRICS: dict[str, tuple[str, str]] = {
    "users": ("count", "rows published (one per active user)"),
    "fallback_rate": ("rate", "share of users given the popularity fallback list"),
    "coverage": ("rate", "share of the model's items in anyone's list (coverage@top_n)"),
    "gini": ("rate", "Gini coefficient of item exposure over the model's items (0: even, 1: one item)"),
    "top1pct_share": ("rate", "share of all list slots taken by the 1% most exposed items"),
    "score_p05": ("score", "5th percentile of model-row scores (sampled users)"),
    "score_p50": ("score", "median of model-row scores (sampled users)"),
    "score_p95": ("score", "95th percentile of model-row scores (sampled users)"),
    "fallback_score_p50": ("score", "median of fallback-row scores (popularity shares; sampled users)"),
    "overlap": ("rate", "mean |today ∩ previous| / list length, users in both days' lists (sampled)"),
    "jaccard": ("rate", "mean Jaccard of today's and the previous date's list, same users (sampled)"),
    "new_item_share": ("rate", "share of list slots holding items absent from the previous date's lists"),
    "exposure_shift": ("rate", "total variation distance between today's and the previous date's item exposure"),
    "cold_item_share": ("rate", "share of list slots flagged cold (the optional `cold` column)"),
    "coverage_vs_gate": ("ratio", "coverage@K today / the version's coverage@K recorded at training and gate time"),
}


class Threshold(BaseModel):
    """One bound and what crossing it does. A bare number in YAML means `{value: n, action: warn}`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    value: float
    action: Action = "warn"

    @model_validator(mode="before")
    @classmethod
    def _bare_number(cls, v: Any) -> Any:
        if isinstance(v, int | float) and not isinstance(v, bool):
            return {"value": v}
        return v


class Rule(BaseModel):
    """Bounds on one metric: absolute `min` / `max`; against the previous published date, `max_drift` (the
    relative change |today - previous| / |previous|, either way) and `max_drop` ((previous - today) / previous:
    falls only, e.g. a coverage collapse)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min: Threshold | None = None
    max: Threshold | None = None
    max_drift: Threshold | None = None
    max_drop: Threshold | None = None

    @model_validator(mode="after")
    def _possible(self) -> Rule:
        if self.min is not None and self.max is not None and self.min.value > self.max.value:
            raise ValueError(f"min {self.min.value} is above max {self.max.value}: no value could pass")
        for name in ("max_drift", "max_drop"):
            t = getattr(self, name)
            if t is not None and not t.value > 0:
                raise ValueError(f"{name} {t.value} must be above 0 (a relative change, e.g. 0.3 for 30%)")
        if self.max_drop is not None and self.max_drop.value >= 1:
            raise ValueError(f"max_drop {self.max_drop.value} must be below 1 (a fall of 100% or more cannot be "
                             "exceeded by a non-negative metric)")
        return self


def _default_rules() -> dict[str, Rule]:
    """Block only clearly broken output (a coverage collapse); warn on the rest (configs/monitor.yaml says why)."""
    return {
        "fallback_rate": Rule(max=Threshold(value=0.2)),  # the block is check_shares' max_fallback_share (0.5)
        "coverage": Rule(max_drop=Threshold(value=0.8, action="block"), max_drift=Threshold(value=0.3)),
        "users": Rule(max_drift=Threshold(value=0.5)),
        "gini": Rule(max_drift=Threshold(value=0.2)),
        "top1pct_share": Rule(max_drift=Threshold(value=0.3)),
        "overlap": Rule(min=Threshold(value=0.2)),
        "new_item_share": Rule(max=Threshold(value=0.5)),
        "exposure_shift": Rule(max=Threshold(value=0.5)),
        "coverage_vs_gate": Rule(min=Threshold(value=0.5)),
    }


class MonitorConfig(BaseModel):
    """The daily output monitoring of `recsys infer` (InferJob.monitor): on, its rules, its sample sizes, where
    its MLflow runs go."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    rules: dict[str, Rule] = Field(default_factory=_default_rules)
    sample_users: int = Field(10_000, ge=1, le=100_000, description=(
        "users (chosen by a stable hash of the user id) whose lists give the score quantiles and the day-over-day "
        "overlap; the overlap reads the previous date's lists of these users only"))
    experiment: str = Field("recsys-daily", min_length=1, max_length=200,
                            description="MLflow experiment of the daily runs (one run per published date)")

    @field_validator("rules")
    @classmethod
    def _known_and_in_range(cls, v: dict[str, Rule]) -> dict[str, Rule]:
        unknown = [n for n in v if n not in METRICS]
        if unknown:
            raise ValueError(f"unknown metric(s) {', '.join(repr(n[:60]) for n in unknown)}: rules can be set on "
                             f"{', '.join(METRICS)}")
        for name, rule in v.items():
            kind = METRICS[name][0]
            for side in ("min", "max"):
                t = getattr(rule, side)
                if t is None:
                    continue
                if kind == "rate" and not 0.0 <= t.value <= 1.0:
                    raise ValueError(f"{name}.{side} {t.value} is outside [0, 1]: {name} is a share")
                if kind in ("count", "ratio") and t.value < 0:
                    raise ValueError(f"{name}.{side} {t.value} is negative: {name} cannot be")
        return v


def load_monitor_config(path: str | Path | None) -> MonitorConfig:
    """MonitorConfig from a YAML file (safe_load; keys of MonitorConfig, rules replace the defaults whole); the
    defaults when `path` is None. A missing or unreadable file, bad YAML, or an invalid rule: one DataError naming
    the file and the fix."""
    if path is None:
        return MonitorConfig()
    p = Path(path)
    fix = "write plain `key: value` YAML with the keys of MonitorConfig (see configs/monitor.yaml)"
    if not p.is_file():
        raise DataError(f"monitor config {p} not found", "pass an existing YAML file (e.g. configs/monitor.yaml)")
    try:
        data = yaml.safe_load(p.read_bytes().decode("utf-8")) or {}
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        why = " ".join(str(e).split())[:200]
        raise DataError(f"monitor config {p} is not valid YAML text ({why})", fix) from e
    except OSError as e:
        raise DataError(f"monitor config {p} cannot be read ({e.strerror or e})", "check the file and its permissions") from e
    if not isinstance(data, dict):
        raise DataError(f"monitor config {p} is not a mapping", fix)
    try:
        return MonitorConfig(**data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        msg = str(first["msg"]).removeprefix("Value error, ")
        raise DataError(f"monitor config {p}: {where}: {msg}", "fix that rule (metric names and bounds: "
                        "pipeline.serving.monitoring.config.METRICS; configs/monitor.yaml)") from None
