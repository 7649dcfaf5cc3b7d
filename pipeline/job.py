"""The one shape of every job: a frozen pydantic config whose `run()` returns a frozen, typed result.

The CLI, the DAGs (through pipeline.orchestration), benchmarks and tests all build a job and call `run()`; a result
travels between Airflow tasks as its small JSON (`to_xcom()`) and is read back with `model_validate`.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from typing import Any

from pydantic import BaseModel, ConfigDict


class JobResult(BaseModel):
    """What a job returns: small, frozen, JSON-serializable (it is the XCom between tasks)."""

    # NaN/inf (a metric of an empty activity group) as "NaN"/"Infinity": strict JSON, which Airflow's XCom
    # requires; model_validate reads them back as floats
    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="strings")

    def to_xcom(self) -> dict[str, Any]:
        """The result as small, strict JSON (what an Airflow task returns); `model_validate` reads it back."""
        data: dict[str, Any] = json.loads(self.model_dump_json())
        return data


class Job(BaseModel, ABC):
    """A job's whole configuration; validated on construction, immutable, logged as given."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @abstractmethod
    def run(self) -> JobResult:
        """Do the work; raise pipeline.errors.DataError (exit 2 at the CLI) for bad input."""
