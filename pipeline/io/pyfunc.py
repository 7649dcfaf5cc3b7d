"""The MLflow pyfunc face of a ModelBundle (kept apart from pipeline.io.bundle so that loading a bundle needs no MLflow)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from mlflow.pyfunc import PythonModel

from pipeline.io.bundle import ModelBundle


class BundleModel(PythonModel):
    """pyfunc wrapper. Input: a DataFrame with a list column `item_ids` (a user's history, external ids).
    Output: a DataFrame with `item_ids` (top-k external ids, best first), `scores`, `fallback` (no known item)."""

    bundle: ModelBundle

    def load_context(self, context: Any) -> None:
        self.bundle = ModelBundle.load(context.artifacts["bundle"])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        k = int((params or {}).get("k", 100))
        b = self.bundle
        index = b.item_index()
        rows, cols = [], []
        for r, hist in enumerate(model_input["item_ids"]):
            for it in hist if hist is not None else []:
                c = index.get(it.item() if hasattr(it, "item") else it)
                if c is not None:
                    rows.append(r)
                    cols.append(c)
        x = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(len(model_input), b.n_items))
        x.sum_duplicates()
        x.data[:] = 1.0
        top, scores = b.recommend(x, k)
        fb_items, fb_scores = b.fallback(k)
        known = np.diff(x.indptr) > 0
        out_items = [b.item_ids[top[i]].tolist() if known[i] else b.item_ids[fb_items].tolist() for i in range(len(x.indptr) - 1)]
        out_scores = [scores[i].tolist() if known[i] else fb_scores.tolist() for i in range(len(x.indptr) - 1)]
        return pd.DataFrame({"item_ids": out_items, "scores": out_scores, "fallback": ~known})
