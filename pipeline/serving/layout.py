"""Where the daily recommendations live in the lake, in one place: the Delta Lake table `<out>/recommendations`,
partitioned by `dt` (a date), each run staged in `<out>/recommendations/dt=YYYY-MM-DD/run-<id>/`.

The job publishes there (pipeline.io.publish: one Delta commit per date), the readers (pipeline.serving.recs, or
any Delta reader: DuckDB, Polars, Spark, Trino) read the table's live files, and the orchestration takes the
partition's URI from the job's result (InferResult.partition_uri) instead of building it.
"""

from __future__ import annotations

import datetime as dt

from pipeline.io import lake

RECOMMENDATIONS = "recommendations"


def recommendations_root(out: str) -> lake.Location:
    """`<out>/recommendations`: the Delta table's root (its `_delta_log` and one dt= folder per date)."""
    return lake.resolve(out).join(RECOMMENDATIONS)


def table_uri(out: str) -> str:
    """The URI a Delta reader opens: `<out>/recommendations`."""
    return recommendations_root(out).uri


def partition(out: str, date: dt.date) -> lake.Location:
    """`<out>/recommendations/dt=DATE`: the folder where a date's runs are staged (the log says which are live)."""
    return recommendations_root(out).join(f"dt={date.isoformat()}")


def partition_uri(out: str, date: dt.date) -> str:
    """The URI of `partition(out, date)`, as published in InferResult.partition_uri."""
    return partition(out, date).uri
