"""Monitoring inside a real publish (local engine, tiny model, a lake folder): metrics in the manifest and a report
next to it; day-over-day drift and overlap on two consecutive dates; a blocking rule commits nothing and names the
metric; a warning is committed and recorded."""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from infer_support import events_table, run_infer, tiny_bundle, write_events_local

from pipeline.errors import DataError
from pipeline.io.bundle import ModelBundle
from pipeline.serving.job import InferJob, publish_recommendations
from pipeline.serving.monitoring import MonitorConfig
from pipeline.serving.recs import committed_dates, read_recommendations

DAY1, DAY2 = dt.date(2024, 5, 2), dt.date(2024, 5, 3)


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    return tiny_bundle()


@pytest.fixture(scope="module")
def events(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_events_local(events_table(n_users=60), tmp_path_factory.mktemp("events"))


def job(events: str, out: Path, day: dt.date, **kw: Any) -> InferJob:
    base: dict[str, Any] = {"date": day, "events": events, "out": str(out), "device": "cpu", "progress": False,
                            "top_n": 5, "shard_events": 100}
    return InferJob(**(base | kw))


def run_dir(out: Path, manifest: dict[str, Any]) -> Path:
    return out / "recommendations" / f"dt={manifest['date']}" / manifest["run"]


def test_two_days_drift_overlap_report_and_exposure_next_to_the_manifest(events: str, bundle: ModelBundle,
                                                                         tmp_path: Path) -> None:
    first = run_infer(job(events, tmp_path, DAY1), bundle, "1")["monitoring"]
    assert first["verdict"] == "ok" and first["previous"] == {"date": None}
    assert first["metrics"]["overlap"] is None and first["metrics"]["new_item_share"] is None  # nothing to compare
    m = run_infer(job(events, tmp_path, DAY2), bundle, "1")
    mon = m["monitoring"]
    got = read_recommendations(str(tmp_path), DAY2)
    # the scalar metrics agree with the committed lists, recomputed here in one piece
    items = [i for row in got.column("item_ids").to_pylist() for i in row]
    assert mon["metrics"]["users"] == got.num_rows == m["rows"]
    assert mon["metrics"]["coverage"] == pytest.approx(len(set(items)) / bundle.n_items)
    assert mon["metrics"]["fallback_rate"] == pytest.approx(sum(got.column("fallback").to_pylist()) / got.num_rows)
    assert mon["slots"] == len(items)
    # against the previous date: its metrics, the relative change of each, the overlap of the same users' lists
    prev = mon["previous"]
    assert prev["date"] == DAY1.isoformat() and prev["metrics"] == first["metrics"]
    assert prev["drift"]["users"] == pytest.approx(mon["metrics"]["users"] / first["metrics"]["users"] - 1)
    assert prev["drift"]["coverage"] == pytest.approx(mon["metrics"]["coverage"] / first["metrics"]["coverage"] - 1)
    before = {r["user_id"]: set(r["item_ids"]) for r in read_recommendations(str(tmp_path), DAY1).to_pylist()}
    shared = [r for r in got.to_pylist() if r["user_id"] in before]
    assert prev["overlap_users"] == len(shared) > 0
    want = sum(len(set(r["item_ids"]) & before[r["user_id"]]) / max(len(r["item_ids"]), len(before[r["user_id"]]))
               for r in shared) / len(shared)
    assert mon["metrics"]["overlap"] == pytest.approx(want, abs=1e-6)
    exposed_before = set().union(*before.values())
    assert mon["metrics"]["new_item_share"] == pytest.approx(sum(i not in exposed_before for i in items) / len(items),
                                                             abs=1e-6)
    # the report and the exposure file sit next to the manifest; the exposure file matches its checksum
    folder = run_dir(tmp_path, m)
    html = (folder / mon["report"]).read_text()
    assert "Daily output 2024-05-03" in html and "data:image/png;base64," in html and "overlap" in html
    data = (folder / mon["exposure"]["path"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == mon["exposure"]["sha256"]
    exposure = pq.read_table(folder / mon["exposure"]["path"])
    assert sum(exposure.column("exposure").to_pylist()) == len(items)


def test_a_blocking_rule_commits_nothing_and_names_the_metric(events: str, bundle: ModelBundle, tmp_path: Path) -> None:
    good = run_infer(job(events, tmp_path, DAY2), bundle, "1")
    strict = MonitorConfig(rules={"coverage": {"min": {"value": 0.99, "action": "block"}}})
    with pytest.raises(DataError) as e:
        publish_recommendations(job(events, tmp_path, DAY2, monitor=strict), bundle, "2")
    msg = str(e.value)
    cov = good["monitoring"]["metrics"]["coverage"]
    assert f"coverage = {cov:.4g} is below the minimum 0.99" in msg and "nothing was committed" in msg
    assert "coverage.min" in msg and "relaxed" in msg
    # the date's previous output is still what readers get; the refused run's folder is gone
    assert committed_dates(str(tmp_path)) == [DAY2]
    served = read_recommendations(str(tmp_path), DAY2)
    assert (served.schema.metadata or {})[b"model_version"] == b"1"
    runs = [p.name for p in (tmp_path / "recommendations" / f"dt={DAY2}").iterdir() if p.name.startswith("run-")]
    assert runs == [good["run"]]


def test_a_warning_is_committed_and_recorded_in_the_manifest(events: str, bundle: ModelBundle, tmp_path: Path) -> None:
    cfg = MonitorConfig(rules={"gini": {"max": 0.01}, "fallback_rate": {"max": {"value": 0.5, "action": "block"}}})
    m = run_infer(job(events, tmp_path, DAY2, monitor=cfg), bundle, "1")
    mon = m["monitoring"]
    assert mon["verdict"] == "warned"
    assert mon["findings"] == [{"metric": "gini", "bound": "max", "value": pytest.approx(mon["metrics"]["gini"], abs=1e-6),
                                "threshold": 0.01, "action": "warn", "previous": None, "change": None}]
    assert committed_dates(str(tmp_path)) == [DAY2]
    html = (run_dir(tmp_path, m) / mon["report"]).read_text()
    assert 'class="warn"' in html and "Published with 1 warning(s)" in html


def test_monitoring_off_records_only_that(events: str, bundle: ModelBundle, tmp_path: Path) -> None:
    m = run_infer(job(events, tmp_path, DAY2, monitor=MonitorConfig(enabled=False)), bundle, "1")
    assert m["monitoring"] == {"enabled": False}
    assert not (run_dir(tmp_path, m) / "_monitoring.html").exists()


def test_a_change_of_top_n_is_not_compared_with_the_previous_date(events: str, bundle: ModelBundle,
                                                                  tmp_path: Path) -> None:
    run_infer(job(events, tmp_path, DAY1), bundle, "1")
    touchy = MonitorConfig(rules={"coverage": {"max_drop": {"value": 0.01, "action": "block"}}})
    mon = run_infer(job(events, tmp_path, DAY2, top_n=1, monitor=touchy), bundle, "1")["monitoring"]
    assert mon["verdict"] == "ok" and "published with top_n 5, not 1" in mon["previous"]["note"]
    assert "drift" not in mon["previous"] and mon["metrics"]["overlap"] is None
    with pytest.raises(DataError, match="coverage dropped by"):  # at the previous date's top_n the rule applies
        publish_recommendations(job(events, tmp_path, DAY2, top_n=5, monitor=touchy), bundle, "1")
