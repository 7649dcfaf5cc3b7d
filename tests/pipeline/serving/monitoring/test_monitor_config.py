"""MonitorConfig: the documented YAML is the defaults; unknown metrics and impossible thresholds fail when the config
is built or loaded (before any scoring), each with one line naming the rule."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from pydantic import ValidationError

from pipeline.errors import DataError
from pipeline.serving.job import InferJob
from pipeline.serving.monitoring import MonitorConfig, load_monitor_config

REPO = Path(__file__).resolve().parents[4]


def test_configs_monitor_yaml_is_the_default_config() -> None:
    cfg = load_monitor_config(REPO / "configs" / "monitor.yaml")
    assert cfg == MonitorConfig()
    assert load_monitor_config(None) == MonitorConfig()
    blocking = {(m, b) for m, r in cfg.rules.items() for b in ("min", "max", "max_drift", "max_drop")
                if getattr(r, b) is not None and getattr(r, b).action == "block"}
    assert blocking == {("coverage", "max_drop")}  # only clearly broken output blocks (fallback: check_shares)


@pytest.mark.parametrize(("text", "needle"), [
    ("rules:\n  covrage: {min: 0.1}\n", "unknown metric(s) 'covrage'"),
    ("rules:\n  coverage: {min: 0.5, max: 0.2}\n", "min 0.5 is above max 0.2"),
    ("rules:\n  fallback_rate: {max: -0.1}\n", "fallback_rate.max -0.1 is outside [0, 1]"),
    ("rules:\n  fallback_rate: {max: 1.5}\n", "outside [0, 1]"),
    ("rules:\n  users: {min: -3}\n", "users.min -3.0 is negative"),
    ("rules:\n  gini: {max_drift: 0}\n", "max_drift 0.0 must be above 0"),
    ("rules:\n  gini: {max_drift: -0.2}\n", "max_drift -0.2 must be above 0"),
    ("rules:\n  coverage: {max_drop: 1.0}\n", "max_drop 1.0 must be below 1"),
    ("rules:\n  coverage: {min: {value: 0.1, action: stop}}\n", "rules.coverage.min.action"),
    ("rules:\n  coverage: {minimum: 0.1}\n", "rules.coverage.minimum"),
    ("sample_users: 0\n", "sample_users"),
    ("sample_users: 200000\n", "sample_users"),
    ("- a list\n", "is not a mapping"),
    ("rules: [\n", "is not valid YAML"),
    ("rules: !!python/object:os.system {}\n", "is not valid YAML"),
])
def test_bad_config_files_are_one_data_error_naming_the_problem(tmp_path: Path, text: str, needle: str) -> None:
    p = tmp_path / "monitor.yaml"
    p.write_text(text)
    with pytest.raises(DataError) as e:
        load_monitor_config(p)
    assert needle in str(e.value) and str(p) in str(e.value) and "Fix:" in str(e.value)


def test_missing_file_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_monitor_config(tmp_path / "nope.yaml")


def test_a_bare_number_is_a_warn_threshold_and_rules_replace_the_defaults(tmp_path: Path) -> None:
    p = tmp_path / "m.yaml"
    p.write_text("rules:\n  gini: {max: 0.9}\n  coverage: {min: {value: 0.01, action: block}}\n")
    cfg = load_monitor_config(p)
    assert set(cfg.rules) == {"gini", "coverage"}
    assert cfg.rules["gini"].max is not None and cfg.rules["gini"].max.action == "warn"
    assert cfg.rules["coverage"].min is not None and cfg.rules["coverage"].min.action == "block"


def test_an_infer_job_with_an_impossible_rule_fails_at_construction() -> None:
    with pytest.raises(ValidationError, match=r"min 0\.9 is above max 0\.1"):
        InferJob(date=dt.date(2024, 5, 3), events="/nowhere", out="/nowhere",
                 monitor={"rules": {"coverage": {"min": 0.9, "max": 0.1}}})
    job = InferJob(date=dt.date(2024, 5, 3), events="/nowhere", out="/nowhere")
    assert job.monitor == MonitorConfig() and job.monitor.enabled
