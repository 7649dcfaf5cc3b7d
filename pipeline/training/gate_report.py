"""The gate's record for humans: a markdown report (verdicts and the metric table), and its best-effort upload
to the candidate's MLflow run (report, comparison chart, `gate.*` metrics).

Best-effort: by the time these run, the verdict tags and the ledger line are already written (pipeline.training.gate),
so a failed upload is a warning on the GateResult, never a failed gate.
"""

from __future__ import annotations

import logging
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from pipeline.io import registry
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
             f"- mode: {mode}; verdict: **{'passed' if o.passed else 'failed'}**; promoted: {o.promoted}",
             f"- champion at gate time: {o.champion or 'none (first model: champion gates skipped)'}",
             *(["- missing baselines (trained with baselines: false) "
                + ("are skipped (allow_missing_baselines: true)" if cfg.allow_missing_baselines else
                   "fail the gate (allow_missing_baselines: false)")] if no_baselines else []),
             *(f"- warning: {w}" for w in o.warnings), "",
             "| gate | status | detail |", "|---|---|---|"]
    lines += [f"| {r.gate} | {r.status} | {r.detail} |" for r in o.verdicts]
    lines += ["", "| metric | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for m in metric_names:
        lines.append(f"| {m} | " + " | ".join(f"{o.metrics[c][m]:.4f}" if m in o.metrics[c] else "-" for c in cols) + " |")
    return "\n".join(lines) + "\n"


def log_gate_run(result: GateResult, cfg: GateConfig, mode: str, run_id: str, candidate: dict[str, float],
                 champion: dict[str, float] | None, tracking: str | None = None) -> list[str]:
    """Report (`result.report`), chart and metrics on the candidate's run under gate/<mode>/: best-effort, each
    step on its own. Returns one warning per step that failed (each also logged)."""
    from mlflow.entities import Metric

    from pipeline.training import plots
    from pipeline.training.evaluation import metric_key

    c = registry.client(tracking)
    stamp = int(datetime.now(UTC).timestamp() * 1000)
    warnings: list[str] = []
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

        for what, step in (("report upload", report), ("chart", chart), ("metric batch", metrics)):
            try:
                step()
            except Exception as e:
                msg = f"gate {result.model_name} version {result.version}: {what} on run {run_id} failed " \
                    f"({type(e).__name__}: {registry.secret_free(str(e))}); the verdict and the ledger line are recorded"
                log.warning(msg)
                warnings.append(msg)
    return warnings
