"""pipeline.orchestration.alerts: the failure hook every task carries logs one redacted line and calls the operator's
target; a malformed or broken target is reported and never masks the task's own failure."""

from __future__ import annotations

import logging
import sys
import types
from types import SimpleNamespace

import pytest

from pipeline.errors import DataError
from pipeline.orchestration import alerts


def _context(error: BaseException) -> dict:
    ti = SimpleNamespace(dag_id="weekly_train", task_id="train", run_id="manual__1", try_number=2,
                         log_url="http://127.0.0.1:8080/log")
    return {"ti": ti, "dag_run": SimpleNamespace(run_id="manual__1"), "exception": error}


@pytest.fixture
def sink(monkeypatch: pytest.MonkeyPatch) -> list[alerts.FailureAlert]:
    got: list[alerts.FailureAlert] = []
    mod = types.ModuleType("recsys_test_alert_sink")
    mod.page = got.append  # type: ignore[attr-defined]
    mod.broken = lambda a: 1 / 0  # type: ignore[attr-defined]
    mod.not_callable = 3  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "recsys_test_alert_sink", mod)
    return got


def test_the_target_gets_a_typed_redacted_alert(sink, monkeypatch, caplog) -> None:
    monkeypatch.setenv(alerts.ALERT_ENV, "recsys_test_alert_sink:page")
    with caplog.at_level(logging.ERROR):
        alerts.on_failure(_context(RuntimeError("MLflow at https://bob:hunter2@mlflow.example.com\nrefused")))
    assert len(sink) == 1
    a = sink[0]
    assert (a.dag_id, a.task_id, a.run_id, a.try_number) == ("weekly_train", "train", "manual__1", 2)
    assert "hunter2" not in a.error and "\n" not in a.error and a.error.startswith("RuntimeError: MLflow at")
    assert "hunter2" not in caplog.text and "weekly_train.train" in caplog.text


def test_without_a_target_the_hook_only_logs(sink, monkeypatch, caplog) -> None:
    monkeypatch.delenv(alerts.ALERT_ENV, raising=False)
    with caplog.at_level(logging.ERROR):
        alerts.on_failure(_context(DataError("no snapshot", "run the build")))
    assert sink == [] and "no snapshot" in caplog.text


@pytest.mark.parametrize(("spec", "message"), [
    ("recsys_test_alert_sink.page", "is not 'package.module:function'"),
    ("no_such_module_xyz:page", "cannot be imported"),
    ("recsys_test_alert_sink:missing", "cannot be imported"),
    ("recsys_test_alert_sink:not_callable", "is not callable"),
])
def test_a_bad_target_is_a_clear_error_and_does_not_mask_the_failure(sink, monkeypatch, caplog, spec, message) -> None:
    with pytest.raises(DataError, match=message):
        alerts.load_target(spec)
    monkeypatch.setenv(alerts.ALERT_ENV, spec)
    with caplog.at_level(logging.ERROR):
        alerts.on_failure(_context(RuntimeError("boom")))  # returns: the task's own failure stands
    assert "alert callback" in caplog.text and message.split("'")[0].strip() in caplog.text


def test_a_target_that_raises_is_logged_not_propagated(sink, monkeypatch, caplog) -> None:
    monkeypatch.setenv(alerts.ALERT_ENV, "recsys_test_alert_sink:broken")
    with caplog.at_level(logging.ERROR):
        alerts.on_failure(_context(RuntimeError("boom")))
    assert "alert callback recsys_test_alert_sink:broken failed: division by zero" in caplog.text
