"""The failure hook every DAG task carries: one redacted line in the task log, then the operator's own alerting.

Point ``RECSYS_ALERT_CALLBACK`` at ``package.module:function`` (importable on the Airflow workers); it is called
with a `FailureAlert` (small, typed, credential-free) for every failed task try. Without it the hook only logs.
A broken hook is logged and never masks the task's own failure.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict

from pipeline.errors import DataError
from pipeline.io.redact import redact_text

log = logging.getLogger(__name__)

ALERT_ENV = "RECSYS_ALERT_CALLBACK"
_TARGET = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")


class FailureAlert(BaseModel):
    """What an alert receives about one failed task try."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dag_id: str
    run_id: str
    task_id: str
    try_number: int | None
    error: str  # one line, credentials redacted
    log_url: str | None = None


def load_target(spec: str) -> Callable[[FailureAlert], Any]:
    """The callable named by ``module:function``; a DataError naming the fix when it is malformed or missing."""
    if not _TARGET.match(spec):
        raise DataError(f"{ALERT_ENV}={spec!r} is not 'package.module:function'",
                        f"set {ALERT_ENV} to an importable function, e.g. mycompany.alerts:page")
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise DataError(f"{ALERT_ENV}={spec!r} cannot be imported ({e})",
                        "install the module on the Airflow workers or fix the name") from e
    if not callable(fn):
        raise DataError(f"{ALERT_ENV}={spec!r} is not callable", "name a function taking one FailureAlert")
    return fn


def alert_of(context: Any) -> FailureAlert:
    """The alert for an Airflow callback context (a mapping with ti, dag_run, exception)."""
    ti = context.get("ti") or context.get("task_instance")
    run = context.get("dag_run")
    err = context.get("exception")
    text = f"{type(err).__name__}: {err}" if err is not None else "failed (no exception recorded)"
    return FailureAlert(dag_id=str(getattr(ti, "dag_id", "?")), run_id=str(getattr(run, "run_id", getattr(ti, "run_id", "?"))),
                        task_id=str(getattr(ti, "task_id", "?")), try_number=getattr(ti, "try_number", None),
                        error=redact_text(" ".join(text.split()))[:2000], log_url=getattr(ti, "log_url", None))


def on_failure(context: Any) -> None:
    """Airflow's on_failure_callback: log one line, then call RECSYS_ALERT_CALLBACK's function (if set)."""
    alert = alert_of(context)
    log.error("recsys task failed: %s.%s (%s, try %s): %s", alert.dag_id, alert.task_id, alert.run_id,
              alert.try_number, alert.error)
    spec = os.environ.get(ALERT_ENV, "").strip()
    if not spec:
        return
    try:
        load_target(spec)(alert)
    except Exception as e:  # an alerting bug must not hide the task's failure
        log.error("alert callback %s failed: %s", spec, redact_text(str(e)))
