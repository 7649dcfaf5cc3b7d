"""The gate's record for humans: a markdown report (verdicts and the metric table), and its best-effort upload
to the candidate's MLflow run under gate/<mode>/: the markdown report, the comparison chart, `gate.*` metrics and
the HTML report (pipeline.training.gate_html), which also reads the run's training curves, no-PIA twin and
latent diagnostics (run_facts).

Best-effort: by the time these run, the verdict tags and the ledger line are already written (pipeline.training.gate),
so a failed upload is a warning on the GateResult, never a failed gate.
"""

from __future__ import annotations

import logging
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.io import registry
from pipeline.training.gate_html import SELECT_METRIC, RunFacts, report_html
from pipeline.training.gates import GateConfig, GateResult

log = logging.getLogger(__name__)


def report_markdown(result: GateResult, cfg: GateConfig, mode: str) -> str:
    """The report: mode and verdict, the champion compared with, warnings, one row per gate, the metric table."""
    o = result
    cols = list(o.metrics)
    metric_names = [*cfg.metrics, f"coverage@{cfg.top_n}"]
    # only when it applies; as in gates.check, no popularity baseline means trained with `baselines: false`
    no_baselines = "baseline popularity" not in cols
    lines = [f"# Gate report: {o.model_name} version {o.version}", "",
             f"- mode: {mode}; verdict: **{'passed' if o.passed else 'failed'}**; promoted: {o.promoted}"
             + (f" ({o.held})" if o.held else ""),
             f"- champion at gate time: {o.champion or 'none (first model: champion gates skipped)'}",
             *(["- missing baselines (trained with baselines: false) "
                + ("are skipped (allow_missing_baselines: true)" if cfg.allow_missing_baselines else
                   "fail the gate (allow_missing_baselines: false)")] if no_baselines else []),
             *(f"- warning: {w}" for w in o.warnings), "",
             "| gate | status | detail |", "|---|---|---|"]
    lines += [f"| {r.gate} | {r.status} | {r.detail} |" for r in o.verdicts]
    if o.candidates:
        from pipeline.training.gate_html import candidate_table

        header, rows, _ = candidate_table(o, cfg)
        lines += ["", "## Candidates", "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
        lines += ["| " + " | ".join(f"{x:.4f}" if isinstance(x, float) else str(x) for x in row) + " |" for row in rows]
    lines += ["", "| metric | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for m in metric_names:
        lines.append(f"| {m} | " + " | ".join(f"{o.metrics[c][m]:.4f}" if m in o.metrics[c] else "-" for c in cols) + " |")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class GateUpload:
    """What log_gate_run did: one warning per failed step, and where the HTML report went (None: not uploaded)."""

    warnings: list[str] = field(default_factory=list)
    html_uri: str | None = None


def log_gate_run(result: GateResult, cfg: GateConfig, mode: str, run_id: str, candidate: dict[str, float],
                 champion: dict[str, float] | None, tracking: str | None = None) -> GateUpload:
    """Report (`result.report`), chart, metrics and the HTML report on the candidate's run under gate/<mode>/:
    best-effort, each step on its own (the HTML last, so it lists the earlier steps' failures). Every failed step
    is a warning (also logged)."""
    from mlflow.entities import Metric

    from pipeline.training import plots
    from pipeline.training.evaluation import metric_key

    c = registry.client(tracking)
    stamp = int(datetime.now(UTC).timestamp() * 1000)
    warnings: list[str] = []
    html_uri: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)

        def report() -> None:
            (d / "gate_report.md").write_text(result.report)
            c.log_artifact(run_id, str(d / "gate_report.md"), f"gate/{mode}")

        def chart() -> None:
            plots.gate_chart(result.metrics, [*cfg.metrics, f"coverage@{cfg.top_n}"], d / "gate_chart.png")
            c.log_artifact(run_id, str(d / "gate_chart.png"), f"gate/{mode}")

        def metrics() -> None:
            c.log_batch(run_id, metrics=[Metric(f"gate.{label}.{metric_key(m)}", float(x), stamp, 0)
                                         for label, vals in (("candidate", candidate), ("champion", champion or {}))
                                         for m, x in vals.items() if np.isfinite(x)])

        def html() -> None:
            done = result.model_copy(update={"warnings": [*result.warnings, *warnings]})
            (d / HTML_NAME).write_text(report_html(done, cfg, mode, run_facts(run_id, tracking)), encoding="utf-8")
            c.log_artifact(run_id, str(d / HTML_NAME), f"gate/{mode}")
            html_uri.append(html_report_uri(run_id, mode, tracking))

        for what, step in (("report upload", report), ("chart", chart), ("metric batch", metrics),
                           ("HTML report", html)):
            try:
                step()
            except Exception as e:
                msg = f"gate {result.model_name} version {result.version}: {what} on run {run_id} failed " \
                    f"({type(e).__name__}: {registry.secret_free(str(e))}); the verdict and the ledger line are recorded"
                log.warning(msg)
                warnings.append(msg)
    return GateUpload(warnings, html_uri[0] if html_uri else None)


HTML_NAME = "gate_report.html"


def html_report_uri(run_id: str, mode: str, tracking: str | None = None) -> str:
    """Where the HTML report of a run lies: the artifact's own URI (a local store: a file a browser opens), else
    `runs:/<run_id>/gate/<mode>/gate_report.html` (what `mlflow artifacts download -u` takes); no credentials."""
    path = f"gate/{mode}/{HTML_NAME}"
    try:
        root = registry.client(tracking).get_run(run_id).info.artifact_uri
    except Exception:  # the upload worked; the pointer need not
        root = None
    return registry.secret_free(f"{root.rstrip('/')}/{path}" if root else f"runs:/{run_id}/{path}")


# The per-epoch metrics the training job logs (train_job._epoch_logger: MLflow keys, step = epoch) → record keys.
_EPOCH_KEYS = {"loss": "loss", "beta": "beta", "val_ndcg_at_100": SELECT_METRIC}


def run_facts(run_id: str, tracking: str | None = None) -> RunFacts:
    """What the HTML report shows from the candidate's training run: per-epoch histories of the candidate and its
    no-PIA twin (`compare.<twin>.*` metrics), the twin's test metrics, the latent diagnostics (`diag.*`). Never
    raises: what cannot be read becomes a note."""
    try:
        return _run_facts(run_id, tracking)
    except Exception as e:
        why = f"the training run {run_id} could not be read ({type(e).__name__}: {registry.secret_free(str(e))})"
        log.warning("gate report: %s", why)
        return RunFacts(history_note=why, notes=(why,))


def _run_facts(run_id: str, tracking: str | None) -> RunFacts:
    c = registry.client(tracking)
    run = c.get_run(run_id)
    metrics, tags = run.data.metrics, run.data.tags
    model = tags.get("model", "candidate")
    twins = sorted(k.removeprefix("compare.").removesuffix(".best_epoch") for k in metrics
                   if k.startswith("compare.") and k.endswith(".best_epoch"))
    labels = {"": f"{model} (candidate)"} | {f"compare.{t}.": f"{t} (no PIA)" for t in twins}
    histories: dict[str, list[dict[str, float]]] = {}
    for prefix, label in labels.items():
        by_epoch: dict[int, dict[str, float]] = defaultdict(dict)
        for key, name in _EPOCH_KEYS.items():
            if prefix + key in metrics:  # the run's latest value: the metric exists, its history is worth a call
                for m in c.get_metric_history(run_id, prefix + key):
                    by_epoch[int(m.step)][name] = float(m.value)
        if by_epoch:
            histories[label] = [{"epoch": float(e)} | by_epoch[e] for e in sorted(by_epoch)]
    twin = (twins[0], _test_metrics(metrics, f"compare.{twins[0]}.test.")) if twins else None
    diagnostics = {label: d for prefix, label in labels.items() if (d := _diag(metrics, "diag." + prefix))}
    note = "the run has no per-epoch metrics (loss, beta, val_ndcg_at_100)"
    cold_head = {k.removeprefix("cold_head."): v for k, v in tags.items() if k.startswith("cold_head.")}
    return RunFacts(histories=histories, twin=twin, diagnostics=diagnostics, diag_status=tags.get("diag.status"),
                    history_note=note, cold_head=cold_head)


def _test_metrics(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    """`<prefix>ndcg_at_100` → 'ndcg@100' (evaluation.metric_key backwards), per-group values left out."""
    return {k.removeprefix(prefix).replace("_at_", "@"): float(v) for k, v in metrics.items()
            if k.startswith(prefix) and not k.startswith(prefix + "group.")}


def _diag(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    """The `diag.*` metrics of one model (the candidate's: `diag.` without `diag.compare.`), no per-group values."""
    skip = (prefix + "group.", *(("diag.compare.",) if prefix == "diag." else ()))
    return {k.removeprefix(prefix): float(v) for k, v in metrics.items() if k.startswith(prefix) and not k.startswith(skip)}
