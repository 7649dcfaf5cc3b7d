"""The model as it travels: a fitted recommender + its item vocabulary + config + the fallback ranking.

A `ModelBundle` is saved as one folder and logged to MLflow as one pyfunc model (pipeline.io.pyfunc.BundleModel),
so that inference can never pair weights with the wrong item index. The registered pyfunc's artifact "bundle"
is that folder. This module does not import MLflow (inference workers load bundles without it).

    bundle/recommender.pt   the fitted model.recommenders object (torch.save; weights on the CPU)
    bundle/items.parquet    column → external item id, and the training popularity of each column
    bundle/bundle.json      name, config (credentials stripped from URIs), snapshot id, format version
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp
import torch

from model.base import Recommender
from pipeline.io.redact import redact_values

FORMAT_VERSION = 1


@dataclass
class ModelBundle:
    recommender: Recommender  # fitted
    item_ids: np.ndarray  # [I] external id of each column (int64 or str)
    popularity: np.ndarray  # [I] float32 training interactions per column: the cold-start fallback
    name: str = "multivae-pia"
    config: dict[str, Any] = field(default_factory=dict)
    snapshot_id: str = ""

    def __post_init__(self) -> None:
        if len(self.item_ids) != len(self.popularity) or len(self.item_ids) != getattr(self.recommender, "n_items", -1):
            raise ValueError("item_ids, popularity and the recommender must cover the same item columns")

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def item_index(self) -> dict[Any, int]:
        """External item id → column (unknown ids are absent)."""
        return {k: i for i, k in enumerate(self.item_ids.tolist())}

    def fallback(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The top-k columns by training popularity, with their normalized popularity as the score."""
        k = min(k, self.n_items)
        order = np.lexsort((np.arange(self.n_items), -self.popularity))[:k]  # ties: lower column first
        total = float(self.popularity.sum()) or 1.0
        return order.astype(np.int64), (self.popularity[order] / total).astype(np.float32)

    def recommend(self, history: sp.csr_matrix, k: int, batch_size: int = 2000,
                  on_batch: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k columns and scores for rows of `history` (over this bundle's columns), seen items removed."""
        return self.recommender.recommend(history, k, batch_size=batch_size, on_batch=on_batch)

    def save(self, directory: str | Path) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        torch.save(self.recommender, d / "recommender.pt")
        ids = pa.array(self.item_ids.astype(np.int64)) if np.issubdtype(self.item_ids.dtype, np.integer) \
            else pa.array(self.item_ids.astype(str))
        pq.write_table(pa.table({"item_id": ids, "popularity": pa.array(self.popularity.astype(np.float32))}),
                       d / "items.parquet")
        meta = {"format_version": FORMAT_VERSION, "name": self.name, "config": redact_values(self.config),
                "snapshot_id": self.snapshot_id, "n_items": self.n_items}
        (d / "bundle.json").write_text(json.dumps(meta, indent=2, default=str))
        return d

    @classmethod
    def load(cls, directory: str | Path, device: str | None = None) -> ModelBundle:
        d = Path(directory)
        meta = json.loads((d / "bundle.json").read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"model bundle format {meta.get('format_version')} is not {FORMAT_VERSION}: retrain")
        rec = torch.load(d / "recommender.pt", map_location="cpu", weights_only=False)  # our own registry's file
        if device is not None:
            rec.to(device)
        items = pq.read_table(d / "items.parquet")
        return cls(rec, items["item_id"].to_numpy(zero_copy_only=False), items["popularity"].to_numpy().astype(np.float32),
                   meta["name"], meta.get("config", {}), meta.get("snapshot_id", ""))
