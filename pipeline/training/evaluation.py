"""Evaluation shared by the training job and the research harness: the metrics reported, activity groups, one
model's summary row and its flat MLflow keys. Pure (numpy/torch), no I/O."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from model.base import Recommender
from model.evaluate import EvalResult
from pipeline.io.hardware import describe_cpu

METRICS = ("recall@20", "recall@50", "ndcg@100")
ACTIVITY_GROUPS: tuple[tuple[str, int, float], ...] = (
    ("[5-10]", 5, 10), ("[11-50]", 11, 50), ("[51-100]", 51, 100), ("[100+]", 101, math.inf),
)


def activity_groups(counts: np.ndarray) -> dict[str, np.ndarray]:
    """Masks of users by interaction count (ARCHITECTURE.md's activity groups)."""
    return {name: (counts >= lo) & (counts <= hi) for name, lo, hi in ACTIVITY_GROUPS}


def summarize(name: str, seed: int, rec: Recommender, res: EvalResult, user_counts: np.ndarray) -> dict[str, Any]:
    """One fitted model's row: mean metrics, coverage, popularity bias, fit time, best epoch, per activity group."""
    row: dict[str, Any] = {"seed": seed, "fit_seconds": rec.fit_seconds, **res.mean(),
                           "mean_popularity@20": res.mean_popularity,
                           "best_epoch": getattr(rec, "best_epoch", None)}
    groups = {}
    for g, mask in activity_groups(user_counts).items():
        groups[g] = {"users": int(mask.sum())} | {
            m: float(np.nanmean(res.per_user[m][mask])) if mask.any() else float("nan") for m in METRICS}
    row["groups"] = groups
    return row


def metric_key(name: str) -> str:
    """MLflow-safe metric/tag key: 'ndcg@100' → 'ndcg_at_100', '[100+]' → '100plus'."""
    return name.replace("@", "_at_").replace("[", "").replace("]", "").replace("+", "plus")


def summary_metrics(row: dict[str, Any], top_n: int) -> dict[str, float]:
    """A `summarize` row → flat metric keys: overall, coverage, popularity bias, per activity group."""
    out = {metric_key(m): float(row[m]) for m in METRICS}
    out[metric_key(f"coverage@{top_n}")] = float(row[f"coverage@{top_n}"])
    out[metric_key(f"mean_popularity@{top_n}")] = float(row["mean_popularity@20"])  # summarize's fixed key name
    for g, vals in row["groups"].items():
        out[f"group.{metric_key(g)}.users"] = float(vals["users"])
        for m in METRICS:
            out[f"group.{metric_key(g)}.{metric_key(m)}"] = float(vals[m])
    return out


def machine_name(device: str) -> str:
    """What a figure was measured on: the GPU's name, or the CPU as /proc/cpuinfo names it (model string,
    family/model, CPUs, the flags that decide bf16) and torch's thread count."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{describe_cpu()}; {torch.get_num_threads()} torch threads"
