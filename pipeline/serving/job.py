"""`recsys infer` as a job: score every active user for a date with one model version and publish the lists
as the date's files of the Delta table `<out>/recommendations` (pipeline.serving.layout), in one commit.

    InferJob(...).run()  ──load the model once (alias → version)──▶ engine (local or spark)
        ──parts, each checked, staged in dt=DATE/run-<id>/──▶ shares checked ──▶ _manifest.json
        ──▶ one Delta commit: the date's old files out, the run's in (pipeline.io.publish) ──▶ InferResult

`InferJob` is the whole configuration (the engines' `InferOptions` plus where the model comes from and where
the output goes); `run()` returns an `InferResult`, the small typed summary the CLI prints and the DAG passes
on (its `partition_uri` is where the recommendations are; the full manifest stays in the lake).
`publish_recommendations` is `run()` with a bundle already in memory (tests, benchmarks).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from pipeline.io import lake, registry
from pipeline.io.hardware import default_dense_bytes
from pipeline.io.publish import MANIFEST, PartitionWriter
from pipeline.io.redact import redact_uri
from pipeline.io.spark import SparkConfig
from pipeline.job import Job, JobResult
from pipeline.serving import checks, layout, monitoring
from pipeline.serving.cold_items import prepare_cold_items
from pipeline.serving.local_engine import run_local
from pipeline.serving.model_loading import load_model, resolve_device
from pipeline.serving.options import DEFAULT_MODEL, InferOptions
from pipeline.serving.scoring import precision_in_effect
from pipeline.serving.spark_engine import run_spark
from pipeline.serving.vocab import vocabulary

if TYPE_CHECKING:
    from pipeline.io.bundle import ModelBundle

log = logging.getLogger(__name__)


class InferResult(JobResult):
    """One published date: where it is, which model made it, what it holds (the manifest has the details)."""

    partition_uri: str  # <out>/recommendations/dt=DATE: read it with pipeline.serving.recs (or any Delta reader)
    run: str  # the committed run folder inside the partition
    version: int  # the Delta table version of the commit (`recsys history`, `recsys restore --version`)
    date: dt.date
    model_name: str  # the registered model's name (job.model a models:/ URI), else the bundle's name
    model_version: str  # the concrete version every row names (an alias resolved once)
    users: int  # rows published: one per active user
    fallback_users: int  # users without a known item: the popularity list
    events: int  # events in the history window
    unknown_item_events: int  # events whose item the model does not know (skipped)
    files: int  # part files
    precision: str  # of the scoring matmuls, as used
    # with an availability list (pipeline.serving.availability; 0 without): users whose model items were backfilled
    # from popular available ones, and users left with fewer than N items (too few available unseen items)
    availability_backfilled_users: int = 0
    availability_short_users: int = 0
    # with an exclusion list (pipeline.serving.exclusions; 0 without): the (user, known item) pairs in it, its
    # rows whose item neither the model nor the day's scored new titles hold (ignored), active users with an
    # exclusion, and those users backfilled / left with fewer than N items (with an availability list too, those
    # two are in its counts)
    exclusions: int = 0
    exclusions_unknown_items: int = 0
    exclusions_users: int = 0
    exclusions_backfilled_users: int = 0
    exclusions_short_users: int = 0
    # new items of the day's items file scored by the model's cold head (pipeline.serving.cold_items; the
    # manifest's cold_items_reason says why none were): scored, distinct ones shown, users with one
    cold_items_scored: int = 0
    cold_items_shown: int = 0
    cold_users: int = 0
    seconds: float

    def manifest(self) -> dict[str, Any]:
        """The run's full `_manifest.json` (files with checksums and user ranges, sharding, phase seconds), read
        from the lake. It stays after a later run replaces the date, until a vacuum removes the run."""
        body = lake.resolve(self.partition_uri).join(self.run, MANIFEST).read_bytes()
        manifest: dict[str, Any] = json.loads(body)
        return manifest


class InferJob(InferOptions, Job):
    """Daily batch inference for `date`: the engines' options (pipeline.serving.options.InferOptions: events,
    history window, top_n, precision, memory budget, shards) plus the model, its registry and the output."""

    out: str  # lake root: the job writes <out>/recommendations/dt=DATE/
    model: str = DEFAULT_MODEL  # models:/NAME@ALIAS, models:/NAME/VERSION, or a ModelBundle.save folder
    tracking_uri: str | None = None  # the MLflow registry models:/ resolves against (None: MLFLOW_TRACKING_URI, else local)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    engine: Literal["local", "spark"] = "local"
    spark: SparkConfig | None = None  # the Spark engine's session (None: RECSYS_SPARK_* via SparkConfig.from_env)
    monitor: monitoring.MonitorConfig = monitoring.MonitorConfig()  # daily output monitoring (configs/monitor.yaml)
    # after the commit, drop dates older than date - retention_days (one commit, restorable for a week) and vacuum
    # what no version of the last week needs; None keeps every date. Replaces an S3 expiry rule, which would delete
    # the Delta log and live files under readers.
    retention_days: int | None = Field(None, ge=1)
    # the model's weights must fit this (MiB), checked from the bundle's description before they are read: a dense
    # EASE over I items is 4 I^2 bytes. None: a quarter of this machine's memory, at most 32 GiB
    max_model_mb: int | None = Field(None, ge=1)

    @property
    def partition_uri(self) -> str:
        """Where this job publishes: `<out>/recommendations/dt=DATE`."""
        return layout.partition_uri(self.out, self.date)

    def run(self) -> InferResult:
        """Load the model (an alias is resolved once, to the version every row names), score every active user,
        check and publish. Raises DataError (nothing published) for bad input or a failed output check."""
        t0 = time.perf_counter()
        _ = self.first_day  # a window off the calendar fails here, before the model is loaded
        device = resolve_device(self.device)
        if self.model.startswith("models:/"):
            log.info("loading %s from the registry at %s", self.model, redact_uri(registry.tracking_uri(self.tracking_uri)))
        limit = self.max_model_mb * 2**20 if self.max_model_mb else default_dense_bytes()
        bundle, version = load_model(self.model, device, self.tracking_uri, limit)
        return _publish(self, bundle, version, device, t0)


def publish_recommendations(job: InferJob, bundle: ModelBundle, model_version: str) -> InferResult:
    """`job.run()` with a bundle already in memory, named `model_version` in every row (job.model is only
    recorded): moved to the job's device, then scored, checked and published the same way."""
    t0 = time.perf_counter()
    device = resolve_device(job.device)
    bundle.recommender.to(device)
    return _publish(job, bundle, model_version, device, t0)


def _publish(job: InferJob, bundle: ModelBundle, model_version: str, device: str, t0: float) -> InferResult:
    _ = job.first_day
    # the day's new items, before anything is staged: a bad items file fails here (nothing published)
    cold, cold_info = prepare_cold_items(job, job.out, bundle, vocabulary(bundle))
    writer = PartitionWriter(layout.partition(job.out, job.date))
    if job.engine == "spark":
        stats = run_spark(job, bundle, model_version, writer, spark_config=job.spark, cold=cold)
    else:
        stats = run_local(job, bundle, model_version, writer, cold=cold)
    stats = cold_info | {"cold_items_shown": 0, "cold_users": 0} | stats
    try:  # before the commit: a refused run leaves the date's previous partition published
        checks.check_shares(job, stats["events"], stats["unknown_item_events"], stats["active_users"],
                            stats["fallback_users"])
    except BaseException:
        writer.abort()
        raise
    # the local engine decides by capability and reports it; otherwise (Spark) the capability-blind choice
    precision = stats.get("precision") or precision_in_effect(job.precision, device)
    stats.setdefault("precision_reason", f"{job.precision} requested; engine {job.engine} does not check capability")
    extra = {"date": job.date.isoformat(), "model_uri": job.model, "model_version": str(model_version),
             "model_name": bundle.name, "snapshot_id": bundle.snapshot_id, "n_items": bundle.n_items,
             "top_n": job.top_n, "engine": job.engine, "precision": precision,
             "history_days": job.history_days, "max_unknown_item_share": job.max_unknown_item_share,
             "max_fallback_share": job.max_fallback_share, **stats,
             "seconds": round(time.perf_counter() - t0, 3)}
    try:  # daily output monitoring (pipeline.serving.monitoring): into the manifest; a blocking rule refuses the run
        monitored = monitoring.check_output(job, bundle, str(model_version), writer)
        extra["monitoring"] = monitored.section
    except BaseException:
        writer.abort()
        raise
    m = writer.commit(extra)
    monitoring.record(monitored, m)  # the daily MLflow run, best effort (never raises)
    if job.retention_days is not None:
        _apply_retention(job)
    name = registry.parse_model_uri(job.model)[0] if job.model.startswith("models:/") else bundle.name
    return InferResult(partition_uri=writer.partition.uri, run=m["run"], version=m["version"], date=job.date, model_name=name,
                       model_version=str(model_version), users=m["rows"],
                       fallback_users=m["fallback_users"], events=m["events"], unknown_item_events=m["unknown_item_events"],
                       files=len(m["files"]), precision=precision, seconds=m["seconds"],
                       availability_backfilled_users=m.get("availability_backfilled_users", 0),
                       availability_short_users=m.get("availability_short_users", 0),
                       **{k: m.get(k, 0) for k in ("exclusions", "exclusions_unknown_items", "exclusions_users",
                                                   "exclusions_backfilled_users", "exclusions_short_users")},
                       cold_items_scored=m.get("cold_items_scored", 0), cold_items_shown=m.get("cold_items_shown", 0),
                       cold_users=m.get("cold_users", 0))


def _apply_retention(job: InferJob) -> None:
    """Best effort: the date is already committed, so a failed clean-up is a warning (tomorrow's run retries)."""
    from pipeline.serving.restore import VacuumJob

    cutoff = job.date - dt.timedelta(days=job.retention_days or 0)
    try:
        r = VacuumJob(out=job.out, drop_before=cutoff).run()
    except Exception as e:  # never fail a committed publish over housekeeping
        log.warning("retention: dropping dates before %s failed (the publish stands; retried next run): %s", cutoff, e)
        return
    log.info("retention: dropped %d date(s) before %s; vacuum deleted %d file(s)", len(r.dropped_dates), cutoff, r.files)
