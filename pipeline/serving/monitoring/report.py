"""The daily monitoring report: one self-contained HTML file (pipeline.io.html_report) with the verdict, the metrics
against the previous date and the gate (warn / block marks), the score histogram and the exposure Lorenz curve."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.io.html_report import HtmlReport
from pipeline.serving.monitoring.config import METRICS, MonitorConfig
from pipeline.serving.monitoring.metrics import lorenz
from pipeline.serving.monitoring.rules import Finding


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display where jobs run
    import matplotlib.pyplot as plt

    return plt


def _rule_text(cfg: MonitorConfig, name: str) -> str:
    rule = cfg.rules.get(name)
    if rule is None:
        return ""
    parts = []
    for bound in ("min", "max", "max_drift", "max_drop"):
        t = getattr(rule, bound)
        if t is not None:
            parts.append(f"{bound} {t.value:g} ({t.action})")
    return ", ".join(parts)


def build_report(title: str, cfg: MonitorConfig, summary: dict[str, Any], findings: list[Finding],
                 exposure: np.ndarray, model_scores: np.ndarray, fallback_scores: np.ndarray) -> str:
    """The HTML text. `summary`: the manifest's monitoring section (metrics, previous, gate, meta)."""
    r = HtmlReport(title)
    blocks = [f for f in findings if f.action == "block"]
    warns = [f for f in findings if f.action == "warn"]
    if blocks:
        r.verdict("BLOCKED: nothing committed. " + "; ".join(f.describe() for f in blocks), ok=False)
    elif warns:
        r.verdict(f"Published with {len(warns)} warning(s): " + "; ".join(f.describe() for f in warns), ok=True)
    else:
        r.verdict("Published: every monitoring rule passed", ok=True)
    meta = summary.get("meta", {})
    r.paragraph(" · ".join(f"{k}: {v}" for k, v in meta.items()), note=True)

    prev = summary.get("previous") or {}
    r.heading(f"Metrics against the previous published date ({prev.get('date') or 'none'})")
    metrics, prev_metrics, drift = summary["metrics"], prev.get("metrics") or {}, prev.get("drift") or {}
    by_metric: dict[str, list[Finding]] = {}
    for f in findings:
        by_metric.setdefault(f.metric, []).append(f)
    rows, marks = [], []
    for name in METRICS:
        if name not in metrics:
            continue
        hits = by_metric.get(name, [])
        status: bool | str | None
        if any(f.action == "block" for f in hits):
            status, verdict = False, "block"
        elif hits:
            status, verdict = "warn", "warn"
        elif name in cfg.rules and metrics[name] is not None:
            status, verdict = True, "ok"
        else:
            status, verdict = None, ""
        change = drift.get(name)
        rows.append([name, metrics[name], prev_metrics.get(name), None if change is None else f"{change:+.1%}",
                     _rule_text(cfg, name), verdict])
        marks.append(status)
    r.table(["metric", "today", "previous", "change", "rule", "verdict"], rows, marks=marks)
    r.paragraph("; ".join(f"{k}: {v[1]}" for k, v in METRICS.items() if k in metrics), note=True)

    gate = summary.get("gate") or {}
    r.heading("Against the model version's recorded numbers")
    if gate.get("reference"):
        r.table(["metric", "today", "recorded", "source", "ratio"],
                [[f"coverage@{gate['k']}", gate.get("today"), gate["reference"], gate.get("source"),
                  metrics.get("coverage_vs_gate")]])
    else:
        r.paragraph(gate.get("note") or "no recorded numbers for this model version", note=True)

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    ax = axes[0]
    if len(model_scores):
        ax.hist(model_scores, bins=60, color="#4c72b0")
    ax.set_title(f"model-row scores (sampled users, {len(model_scores):,} slots)")
    ax.set_xlabel("score")
    ax.grid(alpha=0.3)
    x, y = lorenz(exposure)
    axes[1].plot(x, y, label=f"items (Gini {metrics.get('gini', 0.0):.3f})")
    axes[1].plot([0, 1], [0, 1], ls="--", color="grey", label="equal exposure")
    axes[1].set_title("item exposure: Lorenz curve")
    axes[1].set_xlabel("share of the model's items (least exposed first)")
    axes[1].set_ylabel("share of list slots")
    axes[1].legend()
    axes[1].grid(alpha=0.3)
    r.figure(fig, alt="score histogram and exposure Lorenz curve")
    if len(fallback_scores):
        r.paragraph(f"fallback rows' scores are popularity shares (another scale): sampled median "
                    f"{float(np.median(fallback_scores)):.4g} over {len(fallback_scores):,} slots", note=True)
    return r.render()
