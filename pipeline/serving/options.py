"""What both inference engines read from a job: which events, up to which date, and how to score them.

`InferOptions` holds the settings the engines (pipeline.serving.local_engine, pipeline.serving.spark_engine)
and the shared pieces (events, spill, sizing) need; `pipeline.serving.job.InferJob` adds where the model comes
from and where the output goes. The engines take these options rather than the job, so they never import the
job module (the job imports the engines). Light on purpose: the CLI reads DEFAULT_MODEL when it builds its parser.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline.errors import DataError

# The name training registers its versions under, at alias champion (pipeline.training.DEFAULT_REGISTERED_NAME;
# serving may not import training: tests/pipeline/orchestration/test_steps.py checks the two agree).
DEFAULT_MODEL = "models:/recsys-multivae-pia@champion"
PRECISION_HELP = ("scoring matmuls: auto = bf16 on a CPU that multiplies bf16 natively (checked: flags, a calibration "
                  "product, and top-100 overlap with fp32 on the first users), tf32 on CUDA, fp32 otherwise; fp32; "
                  "tf32 (CUDA only); bf16 (warned where the CPU lacks it: emulated, slow). "
                  "See pipeline.serving.precision")


class InferOptions(BaseModel):
    """The engines' settings: the events to read (up to and including `date`) and the scoring knobs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    date: dt.date
    events: str
    top_n: int = Field(100, ge=1, le=10_000)
    precision: Literal["auto", "fp32", "tf32", "bf16"] = Field("auto", description=PRECISION_HELP)
    memory_budget_mb: int = Field(1024, ge=16, description="score matrix + top-k workspace of one batch")
    history_days: int | None = Field(None, ge=1, description="history window in days ending at `date`; None: all ≤ date")
    min_weight: float | None = Field(None, description="binarization: keep events with weight >= this (None: all)")
    shard_events: int | None = Field(None, ge=1, description="events per shard; default: shard_events_for(budget)")
    max_batch: int = Field(4096, ge=1)
    parallel_shards: int | None = Field(None, ge=1, le=64, description=(
        "shards whose histories and whose checks + Parquet may be in flight at once, besides the one being "
        "scored; default: one per 4 CPU cores, at most 8. It matters where scoring is fast (a GPU) and host work "
        "is the bottleneck; there host memory grows with it (up to P shards' results, tables and checks at once)"))
    progress: bool = True
    availability: str | None = Field(None, description=(
        "Parquet file or folder (local or s3://, e.g. <lake>/availability/dt=DATE/) with an item_id column listing "
        "the items that may be recommended on the date (pipeline.serving.availability); None: every item"))
    exclusions: str | None = Field(None, description=(
        "Parquet file or folder (local or s3://, e.g. <lake>/exclusions/dt=DATE/) with user_id and item_id columns, "
        "one row per title that user must not be shown on the date (pipeline.serving.exclusions); None: no exclusions"))
    items: str | None = Field(None, description=(
        "the day's items file or folder (Parquet or CSV, local or s3://; the items contract, pipeline.io.items): "
        "its items the model does not know are scored from their metadata by the bundle's cold head "
        "(pipeline.serving.cold_items). None: <out>/items/dt=DATE when present. Missing: a warning, warm items only"))
    cold_slots: int = Field(2, ge=0, le=100, description=(
        "at most this many new (cold) items per list, each only for a user with a positive cold score; 0: off"))
    # The model's vocabulary is its training items and every training user had one, so its own baseline of both
    # shares is 0: these are absolute ceilings (pipeline.serving.checks.check_shares).
    max_unknown_item_share: float = Field(0.5, ge=0.0, le=1.0, description=(
        "refuse to publish when more than this share of the events in the history window have items the model "
        "does not know (1.0: never refuse)"))
    max_fallback_share: float = Field(0.5, ge=0.0, le=1.0, description=(
        "refuse to publish when more than this share of the active users have no item the model knows (each "
        "would get the popularity fallback; 1.0: never refuse)"))

    @field_validator("precision", mode="before")
    @classmethod
    def _known_precision(cls, v: object) -> object:
        if v not in ("auto", "fp32", "tf32", "bf16"):
            raise DataError(f"unknown precision {str(v)[:40]!r}",
                            "pass --precision auto (bf16 where the CPU has it natively, tf32 on CUDA, else fp32), "
                            "fp32, tf32 or bf16")
        return v

    @property
    def first_day(self) -> dt.date | None:
        """The first day of the history window, or None when the history is every event up to `date`.
        DataError when the window would start before 0001-01-01 (instead of an OverflowError)."""
        if not self.history_days:
            return None
        most = (self.date - dt.date.min).days + 1
        if self.history_days > most:
            raise DataError(f"--history-days {self.history_days} ending at --date {self.date} starts before "
                            f"{dt.date.min}", f"pass --history-days {most} or less, or leave it out to use every "
                                               "event up to the date")
        return self.date - dt.timedelta(days=self.history_days - 1)

    @property
    def day_after(self) -> dt.date | None:
        """The day after `date`, where the history ends (exclusive); None for 9999-12-31 (no later day)."""
        return self.date + dt.timedelta(days=1) if self.date < dt.date.max else None
