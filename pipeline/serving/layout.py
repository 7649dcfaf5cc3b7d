"""Where the daily recommendations live in the lake, in one place: `<out>/recommendations/dt=YYYY-MM-DD/`.

The job publishes there, the readers (pipeline.serving.recs) look there, and the orchestration takes the
partition's URI from the job's result (InferResult.partition_uri) instead of building it.
"""

from __future__ import annotations

import datetime as dt

from pipeline.io import lake

RECOMMENDATIONS = "recommendations"


def recommendations_root(out: str) -> lake.Location:
    """`<out>/recommendations`: the folder holding one dt= partition per date."""
    return lake.resolve(out).join(RECOMMENDATIONS)


def partition(out: str, date: dt.date) -> lake.Location:
    """`<out>/recommendations/dt=DATE`: one date's partition (its `_SUCCESS` names the committed run)."""
    return recommendations_root(out).join(f"dt={date.isoformat()}")


def partition_uri(out: str, date: dt.date) -> str:
    """The URI of `partition(out, date)`, as published in InferResult.partition_uri."""
    return partition(out, date).uri
