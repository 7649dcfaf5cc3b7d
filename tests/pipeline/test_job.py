"""pipeline.job: the one job shape (frozen config, run() → frozen result) and the result's XCom JSON."""

from __future__ import annotations

import json
import math

import pydantic
import pytest

from pipeline.job import Job, JobResult


class Counted(JobResult):
    n: int
    metrics: dict[str, float]


class Count(Job):
    items: tuple[str, ...]

    def run(self) -> Counted:
        return Counted(n=len(self.items), metrics={"share": 1.0, "empty_group": float("nan"), "worst": float("-inf")})


def test_a_result_is_strict_json_and_reads_back_equal() -> None:
    r = Count(items=("a", "b")).run()
    x = r.to_xcom()
    json.dumps(x, allow_nan=False)  # Airflow's XCom refuses NaN: what a task returns must be strict JSON
    back = Counted.model_validate(x)
    assert back.n == 2 and back.metrics["share"] == 1.0 and math.isnan(back.metrics["empty_group"])
    assert back.metrics["worst"] == float("-inf")


def test_jobs_and_results_are_frozen_and_reject_unknown_keys() -> None:
    job = Count(items=("a",))
    with pytest.raises(pydantic.ValidationError):
        job.items = ("b",)  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError, match="extra"):
        Count(items=("a",), itmes=("typo",))  # type: ignore[call-arg]
    with pytest.raises(pydantic.ValidationError):
        job.run().n = 3  # type: ignore[misc]
    with pytest.raises(TypeError, match="abstract"):
        Job()  # type: ignore[abstract]
