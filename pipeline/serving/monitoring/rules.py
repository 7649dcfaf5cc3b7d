"""The rules of a MonitorConfig applied to a date's metrics: one `Finding` per crossed threshold, and the one-line
DataError a blocking finding becomes."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.errors import DataError
from pipeline.serving.monitoring.config import MonitorConfig


@dataclass(frozen=True)
class Finding:
    """A crossed threshold: which metric, which bound (min, max, max_drift, max_drop), today's value and the limit;
    for a drift bound also the previous date's value and the relative change compared with the limit."""

    metric: str
    bound: str
    value: float
    threshold: float
    action: str  # block | warn
    previous: float | None = None
    change: float | None = None  # (value - previous) / |previous| for max_drift, (previous - value) / previous for max_drop

    def describe(self) -> str:
        if self.bound in ("min", "max"):
            side = "below the minimum" if self.bound == "min" else "above the maximum"
            return f"{self.metric} = {self.value:.4g} is {side} {self.threshold:.4g}"
        what = "changed by" if self.bound == "max_drift" else "dropped by"
        return (f"{self.metric} {what} {abs(self.change or 0.0):.1%} since the previous date ({self.previous:.4g} → "
                f"{self.value:.4g}; {self.bound} {self.threshold:.1%})")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate(cfg: MonitorConfig, metrics: dict[str, Any], previous: dict[str, Any] | None) -> list[Finding]:
    """Every threshold of `cfg` crossed by `metrics` (drift: against `previous`, the previous date's metrics).
    A metric without a value today (or, for drift, on the previous date) is not checked."""
    out: list[Finding] = []
    for name, rule in cfg.rules.items():
        value = metrics.get(name)
        if value is None or not math.isfinite(float(value)):
            continue
        v = float(value)
        if rule.min is not None and v < rule.min.value:
            out.append(Finding(name, "min", v, rule.min.value, rule.min.action))
        if rule.max is not None and v > rule.max.value:
            out.append(Finding(name, "max", v, rule.max.value, rule.max.action))
        prev = (previous or {}).get(name)
        if prev is None or not math.isfinite(float(prev)):
            continue
        p = float(prev)
        if rule.max_drift is not None and p != 0 and abs(v - p) / abs(p) > rule.max_drift.value:
            out.append(Finding(name, "max_drift", v, rule.max_drift.value, rule.max_drift.action, p, (v - p) / abs(p)))
        if rule.max_drop is not None and p > 0 and (p - v) / p > rule.max_drop.value:
            out.append(Finding(name, "max_drop", v, rule.max_drop.value, rule.max_drop.action, p, (p - v) / p))
    return out


def blocked_error(findings: list[Finding], date: str, model_version: str) -> DataError:
    """The DataError of the blocking findings: each metric, its value and the threshold; the fix."""
    blocks = [f for f in findings if f.action == "block"]
    names = ", ".join(sorted({f"{f.metric}.{f.bound}" for f in blocks}))
    return DataError(f"output monitoring blocked the publish of {date} (model version {model_version}): "
                     + "; ".join(f.describe() for f in blocks),
                     "nothing was committed (the date's previous output, if any, is still served); investigate the "
                     f"model and its input (runbook: Monitoring the daily output), or re-run with the rule relaxed "
                     f"({names} in the monitor config, InferJob.monitor: a copy of configs/monitor.yaml with "
                     "action: warn or a wider bound)")
