"""MLflow for the daily monitoring, best effort: the version's recorded coverage (the reference of the gate
comparison) and one run per published (or blocked) date in the `recsys-daily` experiment.

Only when a tracking server is configured (InferJob.tracking_uri or MLFLOW_TRACKING_URI): without one, nothing is
logged (an info line), so a local run leaves no ./mlruns or SQLite file behind. A failing server never fails the
publish: the date is committed (or refused) by then; the failure is a warning.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from pipeline.io import registry

log = logging.getLogger(__name__)

_TAG_COVERAGE = re.compile(r"^test\.coverage_at_(\d+)$")
_GATE_COVERAGE = re.compile(r"^gate\.candidate\.coverage_at_(\d+)$")


def configured_uri(explicit: str | None) -> str | None:
    """The tracking URI when one is configured (explicit, else MLFLOW_TRACKING_URI), else None."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or None


def version_coverage(model_uri: str, model_version: str, tracking: str | None, top_n: int) -> dict[str, Any]:
    """The coverage@K recorded for the served version: the gate's measurement on the version's run
    (`gate.candidate.coverage_at_K`) when it exists, else training's test tag (`test.coverage_at_K`); the largest
    K <= top_n. {} when the model is not a registered version, tracking is not configured, or nothing is recorded;
    {"note": why} when the lookup failed."""
    uri = configured_uri(tracking)
    if not model_uri.startswith("models:/") or uri is None:
        return {}
    try:
        name = registry.parse_model_uri(model_uri)[0]
        with registry.tracking_errors(uri):
            tags = registry.version_tags(name, model_version, uri)
            found: dict[int, tuple[float, str]] = {}
            for tag, text in tags.items():
                m = _TAG_COVERAGE.match(tag)
                if m:
                    found[int(m.group(1))] = (float(text), f"version tag {tag}")
            run_id = tags.get("run_id")
            if run_id:
                for key, value in registry.client(uri).get_run(run_id).data.metrics.items():
                    m = _GATE_COVERAGE.match(key)
                    if m:
                        found[int(m.group(1))] = (float(value), f"gate metric {key} on run {run_id}")
    except Exception as e:  # best effort: the comparison is skipped, the publish goes on
        why = registry.secret_free(" ".join(str(e).split()))[:200]
        log.warning("monitoring: the recorded coverage of %s version %s could not be read (%s)", model_uri,
                    model_version, why)
        return {"note": f"recorded numbers not read: {why}"}
    usable = {k: v for k, v in found.items() if k <= top_n and math.isfinite(v[0]) and v[0] > 0}
    if not usable:
        return {"note": f"version {model_version} records no coverage@K with K <= {top_n}"}
    k = max(usable)
    return {"k": k, "reference": usable[k][0], "source": usable[k][1]}


def _metric_items(section: dict[str, Any]) -> dict[str, float]:
    """The section's numbers as MLflow metrics: the metrics, `drift.<name>` against the previous date, the
    score quantiles as `score.model.pNN` / `score.fallback.pNN`, and `findings.warn` / `findings.block`."""
    out: dict[str, float] = {}

    def put(key: str, v: Any) -> None:
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v)):
            out[key] = float(v)

    for k, v in section.get("metrics", {}).items():
        put(k, v)
    for k, v in ((section.get("previous") or {}).get("drift") or {}).items():
        put(f"drift.{k}", v)
    for which in ("model", "fallback"):
        for q, v in ((section.get("scores") or {}).get(which) or {}).items():
            put(f"score.{which}.{q}", v)
    findings = section.get("findings", [])
    put("findings.warn", sum(1 for f in findings if f.get("action") == "warn"))
    put("findings.block", sum(1 for f in findings if f.get("action") == "block"))
    put("monitor_seconds", section.get("seconds"))
    return out


def log_daily_run(section: dict[str, Any], html: str, tags: dict[str, str], experiment: str,
                  tracking: str | None) -> str | None:
    """One run in `experiment`: the metrics, the tags, the HTML report and the section as JSON (artifacts under
    monitoring/). Returns the run id, or None (not configured, or it failed: logged)."""
    uri = configured_uri(tracking)
    if uri is None:
        log.info("monitoring: no MLflow tracking URI configured (--tracking-uri or MLFLOW_TRACKING_URI); the daily "
                 "metrics are in the manifest and the report next to it, not logged to MLflow")
        return None
    try:
        from mlflow.entities import Metric, Param, RunTag

        with registry.tracking_errors(uri):
            c = registry.client(uri)
            exp = registry.ensure_experiment(experiment, uri)
            run = c.create_run(exp, run_name=f"{tags.get('date', '')} v{tags.get('model_version', '')}",
                               tags={k: str(v)[:5000] for k, v in tags.items()})
            rid = run.info.run_id
            try:
                stamp = int(run.info.start_time or 0)
                c.log_batch(rid, metrics=[Metric(k, v, stamp, 0) for k, v in sorted(_metric_items(section).items())],
                            params=[Param("sample_users", str(section.get("sample_users")))],
                            tags=[RunTag("monitor.verdict", section.get("verdict", ""))])
                with tempfile.TemporaryDirectory() as tmp:
                    d = Path(tmp)
                    (d / "monitoring_report.html").write_text(html, encoding="utf-8")
                    (d / "monitoring.json").write_text(json.dumps(section, indent=2, sort_keys=True, default=str))
                    c.log_artifacts(rid, tmp, "monitoring")
            except BaseException:
                c.set_terminated(rid, "FAILED")
                raise
            c.set_terminated(rid, "FINISHED")
            return str(rid)
    except Exception as e:
        log.warning("monitoring: logging the daily run to MLflow failed (%s); the manifest holds the metrics",
                    registry.secret_free(" ".join(str(e).split()))[:300])
        return None
