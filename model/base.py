"""One interface for every algorithm (after `implicit`): fit, score, batched recommend with the seen
items filtered, and a plain-tensor state for saving (the pipeline does the file I/O)."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp
import torch

from model.metrics import topk_items
from model.sparse import DeviceCSR, SparseBatch, canonical_csr
from model.split import HeldOut


class Recommender(ABC):
    name: ClassVar[str]
    # whether score(..., out=) writes into the buffer; recommend allocates one only then (a buffer the model
    # ignores would be a second [B, I] block outside the inference memory budget)
    scores_into_buffer: ClassVar[bool] = False
    n_items: int = 0
    fit_seconds: float = 0.0
    # wall seconds stopped processes spent on the fit that `_fit` resumed (0 for a fit run in one go)
    resumed_seconds: float = 0.0

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @abstractmethod
    def _fit(self, train: sp.csr_matrix, valid: HeldOut | None, **kwargs: Any) -> None: ...

    @abstractmethod
    def score(self, history: SparseBatch, out: torch.Tensor | None = None) -> torch.Tensor:
        """Scores [B, I] for users given their histories (rows over this model's item columns).

        `out`, a float32 [B, I] buffer, may hold the result (recommend reuses one across batches); always
        use the returned tensor."""

    def fit(self, train: sp.csr_matrix, valid: HeldOut | None = None, **kwargs: Any) -> Recommender:
        if train.shape[0] == 0 or train.nnz == 0:
            raise ValueError("cannot fit on an empty interaction matrix: check the input data and filters")
        self.n_items = int(train.shape[1])
        t0 = time.perf_counter()
        self.resumed_seconds = 0.0
        self._fit(sp.csr_matrix(train, dtype=np.float32), valid, **kwargs)
        self.fit_seconds = self.resumed_seconds + time.perf_counter() - t0
        return self

    def to(self, device: torch.device | str) -> Recommender:
        """Move the fitted state to `device` (inference on another machine than training)."""
        return self

    @torch.no_grad()
    def recommend(self, history: sp.csr_matrix, k: int, *, batch_size: int = 2000, filter_seen: bool = True,
                  on_batch: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k item columns and scores per row of `history`, best first: ([U, k] int64, [U, k] float32).

        The history goes to the device once; results stay there until the end (one copy back), and each
        batch's nnz comes from the host's indptr, so a GPU is not stopped by a host sync per batch for them.
        `on_batch(n)` is called after each batch (progress)."""
        if history.shape[1] != self.n_items:
            raise ValueError(f"history has {history.shape[1]} item columns, the model has {self.n_items}")
        history = canonical_csr(history)  # duplicates summed: host row lengths match the device copy
        x = DeviceCSR.from_scipy(history, self.device)
        indptr = np.asarray(history.indptr)
        n, k = x.n_rows, min(k, self.n_items)
        items = torch.empty(n, k, dtype=torch.int64, device=x.device)  # [U, k]
        scores = torch.empty(n, k, dtype=torch.float32, device=x.device)
        buf = (torch.empty(min(n, batch_size), self.n_items, dtype=torch.float32, device=x.device)  # [B, I]
               if self.scores_into_buffer else None)
        for start in range(0, n, batch_size):
            end = min(n, start + batch_size)
            hist = x.batch(torch.arange(start, end, device=x.device), total=int(indptr[end] - indptr[start]))
            s = self.score(hist, out=None if buf is None else buf[: end - start]).float()  # [B, I]
            if filter_seen:
                s[hist.rows, hist.cols] = -torch.inf
            top = topk_items(s, k)
            items[start:end] = top
            scores[start:end] = torch.gather(s, 1, top)
            if on_batch is not None:
                on_batch(end - start)
        return items.cpu().numpy(), scores.cpu().numpy()
