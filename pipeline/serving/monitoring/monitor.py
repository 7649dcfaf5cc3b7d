"""The daily output monitoring of one publish, called by pipeline.serving.job._publish:

    check_output(job, bundle, version, writer)   before the commit: one streaming pass over the staged parts →
        metrics; the previous published date's metrics, exposure and sampled lists → drift, overlap, new items;
        the version's recorded coverage → coverage_vs_gate; the rules → findings. A blocking finding: the daily
        MLflow run (status blocked), then a DataError (the caller aborts the run: nothing is committed). Else the
        report and the exposure file are written next to the run's manifest, and `section` goes into it.
    record(monitored, manifest)                  after the commit: the daily MLflow run (best effort).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io.publish import PartitionWriter
from pipeline.serving.monitoring import previous, tracking
from pipeline.serving.monitoring.config import MonitorConfig
from pipeline.serving.monitoring.metrics import (
    COLD_COLUMN,
    COLUMNS,
    OutputAccumulator,
    coverage_at,
    list_overlap,
    previous_exposure,
    quantiles,
    relative_change,
    sample_cut,
    score_values,
    summarize,
    total_variation,
)
from pipeline.serving.monitoring.report import build_report
from pipeline.serving.monitoring.rules import Finding, blocked_error, evaluate
from pipeline.serving.vocab import vocabulary

if TYPE_CHECKING:
    from pipeline.io.bundle import ModelBundle

log = logging.getLogger(__name__)

REPORT = "_monitoring.html"
EXPOSURE = "_monitoring_exposure.parquet"
BATCH_ROWS = 65_536


class PublishContext(Protocol):
    """What the monitoring reads of the InferJob (pipeline.serving.job imports this package, not the reverse)."""

    @property
    def monitor(self) -> MonitorConfig: ...
    @property
    def out(self) -> str: ...
    @property
    def date(self) -> dt.date: ...
    @property
    def model(self) -> str: ...
    @property
    def tracking_uri(self) -> str | None: ...
    @property
    def top_n(self) -> int: ...
    @property
    def engine(self) -> str: ...


@dataclass
class Monitored:
    """One publish's monitoring: the manifest section, the findings, the report, what the MLflow run needs."""

    section: dict[str, Any]
    findings: list[Finding] = field(default_factory=list)
    html: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    cfg: MonitorConfig = field(default_factory=MonitorConfig)
    tracking_uri: str | None = None


def staged_batches(writer: PartitionWriter) -> Iterator[pa.RecordBatch]:
    """The run's staged (uncommitted) parts, in part order, as record batches of COLUMNS (and the cold column)."""
    for entry in sorted(writer.files, key=lambda f: str(f["path"])):
        loc = writer.run_dir.join(entry["path"])
        with loc.fs.open_input_file(loc.path) as f:
            pf = pq.ParquetFile(f)
            cols = [c for c in (*COLUMNS, COLD_COLUMN) if c in pf.schema_arrow.names]
            yield from pf.iter_batches(batch_size=BATCH_ROWS, columns=cols)


def _rounded(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 6) if isinstance(v, float) and np.isfinite(v) else v) for k, v in d.items()}


def check_output(job: PublishContext, bundle: ModelBundle, model_version: str, writer: PartitionWriter) -> Monitored:
    """Measure the staged output, compare, apply the rules (module doc). Raises DataError on a blocking rule."""
    cfg = job.monitor
    if not cfg.enabled:
        return Monitored(section={"enabled": False}, cfg=cfg)
    t0 = time.perf_counter()
    vocab = vocabulary(bundle)
    acc = OutputAccumulator(vocab, sample_cut(writer.rows, cfg.sample_users), cfg.sample_users)
    for batch in staged_batches(writer):
        acc.add(batch)
    sample = acc.sample()
    metrics = summarize(acc, job.top_n, sample)
    t_pass = time.perf_counter() - t0

    # the previous published date: its metrics (drift), its exposure (new items, shift), its sampled lists (overlap)
    prev_section: dict[str, Any] = {"date": None}
    prev_metrics: dict[str, Any] | None = None
    prev_day = previous.previous_date(job.out, job.date)
    metrics |= {"overlap": None, "jaccard": None, "new_item_share": None, "exposure_shift": None}
    found = None if prev_day is None else previous.published_manifest(job.out, prev_day)
    if prev_day is not None:
        prev_section["date"] = prev_day.isoformat()
    if found is not None and found[1].get("top_n") not in (None, job.top_n):
        # lists of another length: coverage@N, concentration and overlap are not comparable (a change of --top-n)
        prev_section["note"] = f"published with top_n {found[1]['top_n']}, not {job.top_n}: not compared"
    elif prev_day is not None:
        if found is not None:
            run, manifest = found
            prev_section["model_version"] = str(manifest.get("model_version", ""))
            prev_metrics = (manifest.get("monitoring") or {}).get("metrics")
            exposed = previous.read_exposure(run, manifest)
            if exposed is not None and acc.slots:
                q, q_out = previous_exposure(vocab, *exposed)
                metrics["new_item_share"] = float(acc.exposure[q == 0].sum() / acc.slots)
                metrics["exposure_shift"] = total_variation(acc.exposure.astype(np.float64), q, q_out)
        if sample is not None:
            lists = previous.previous_lists(job.out, prev_day, sample.column("user_id").combine_chunks())
            ov = None if lists is None else list_overlap(sample.select(["user_id", "item_ids"]), lists)
            if ov is not None:
                metrics["overlap"], metrics["jaccard"], prev_section["overlap_users"] = ov
    if prev_metrics is not None:
        prev_section["metrics"] = prev_metrics
        drift = {k: relative_change(v, prev_metrics.get(k)) for k, v in metrics.items()}
        prev_section["drift"] = {k: v for k, v in drift.items() if v is not None}

    # the served version's recorded numbers (MLflow): coverage@K at training / gate time
    gate = tracking.version_coverage(job.model, model_version, job.tracking_uri, job.top_n)
    metrics["coverage_vs_gate"] = None
    if "k" in gate:
        gate["today"] = coverage_at(acc.first_rank, gate["k"])
        metrics["coverage_vs_gate"] = gate["today"] / gate["reference"]

    findings = evaluate(cfg, metrics, prev_metrics)
    blocked = any(f.action == "block" for f in findings)
    verdict = "blocked" if blocked else ("warned" if findings else "ok")
    model_scores, fb_scores = score_values(sample, False), score_values(sample, True)
    section: dict[str, Any] = {
        "enabled": True, "verdict": verdict, "metrics": _rounded(metrics),
        "previous": prev_section, "gate": gate, "findings": [f.as_dict() for f in findings],
        "scores": {"model": quantiles(model_scores), "fallback": quantiles(fb_scores),
                   "model_moments": acc.moments("model"), "fallback_moments": acc.moments("fallback")},
        "sample_users": 0 if sample is None else sample.num_rows, "slots": acc.slots, "n_items": len(vocab),
        "meta": {"date": job.date.isoformat(), "model": job.model, "model_version": model_version,
                 "run": writer.run_name, "engine": job.engine},
    }
    for f in findings:
        (log.error if f.action == "block" else log.warning)("monitoring %s: %s", f.action, f.describe())
    tags = {"date": job.date.isoformat(), "model_uri": job.model, "model_version": model_version,
            "partition": writer.partition.uri, "run": writer.run_name, "engine": job.engine}
    html = build_report(f"Daily output {job.date}: model version {model_version}", cfg, section, findings,
                        acc.exposure, model_scores, fb_scores)
    section["seconds"] = round(time.perf_counter() - t0, 3)
    section["pass_seconds"] = round(t_pass, 3)
    monitored = Monitored(section, findings, html, tags, cfg, job.tracking_uri)
    if blocked:
        tracking.log_daily_run(section, html, tags | {"status": "blocked"}, cfg.experiment, job.tracking_uri)
        raise blocked_error(findings, job.date.isoformat(), model_version)
    section["report"] = REPORT
    section["exposure"] = previous.write_exposure(writer.run_dir, EXPOSURE, vocab, acc.exposure, acc.first_rank)
    writer.run_dir.join(REPORT).write_bytes(html.encode("utf-8"))
    log.info("monitoring: %s, %d users, coverage %.4f, fallback %.4f, %d finding(s), %.2fs", verdict, acc.users,
             metrics["coverage"], metrics["fallback_rate"], len(findings), section["seconds"])
    return monitored


def record(monitored: Monitored, manifest: dict[str, Any]) -> str | None:
    """After the commit: the daily MLflow run (committed run and Delta version tagged). Never raises."""
    if not monitored.section.get("enabled"):
        return None
    tags = monitored.tags | {"status": "committed", "run": str(manifest.get("run", monitored.tags.get("run", "")))}
    if "version" in manifest:
        tags["table_version"] = str(manifest["version"])
    return tracking.log_daily_run(monitored.section, monitored.html, tags, monitored.cfg.experiment,
                                  monitored.tracking_uri)
