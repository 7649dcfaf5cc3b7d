"""Remote job names and idempotency tokens: unique per try of a task instance, the same when a try is resumed."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any


def _map_index(ti: Any) -> int:
    m = getattr(ti, "map_index", -1)
    return -1 if m is None else int(m)


def try_key(context: Mapping[str, Any]) -> tuple[str, str, str, int, int]:
    """(dag, run, task, map index, try) of the task instance in an Airflow context."""
    ti = context["ti"]
    return (str(ti.dag_id), str(context["run_id"]), str(ti.task_id), _map_index(ti),
            int(ti.try_number))


def remote_job_name(project: str, dag_id: str, run_id: str, task_id: str, map_index: int, try_number: int) -> str:
    """A job name for one try of one task instance: `<project>-<task>-<hash of dag, run, task, map index>-t<try>`.

    At most 63 characters of [a-zA-Z0-9-] (SageMaker's rule; EMR Serverless accepts it too). The same try gets the
    same name (a resumed try finds its job), the next try a new one (a retry never collides with the failed job)."""
    digest = hashlib.sha256(f"{dag_id}\n{run_id}\n{task_id}\n{map_index}".encode()).hexdigest()[:12]
    tail = f"-{digest}-t{try_number}"
    slug = re.sub(r"[^a-zA-Z0-9]+", "-", f"{project}-{task_id}").strip("-")
    return f"{slug[: 63 - len(tail)].rstrip('-')}{tail}"


def client_token(dag_id: str, run_id: str, task_id: str, map_index: int, try_number: int) -> str:
    """EMR Serverless's idempotency token for one try: StartJobRun with the same token returns the same job run."""
    return hashlib.sha256(f"{dag_id}\n{run_id}\n{task_id}\n{map_index}\n{try_number}".encode()).hexdigest()[:64]

