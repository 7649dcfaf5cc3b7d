"""The cold head (model.cold_head) inside a model bundle: two optional files, checked like the others.

    bundle/cold_head.json   kind, the fitted featurizer (vocabularies, idf, min-max scaling), δ, μ, pair terms, αβ, λ1,
                            neighbours (absent in older bundles: 0, the dense S)
    bundle/cold_head.pt     tensors only (torch.save, loaded with weights_only=True): each block's warm feature rows
                            as CSR parts (<block>/indptr, /indices int64, /data float32) and, for "marec", k_diag

Both are listed with their sha256 and size in bundle.json's "files" (pipeline.io.bundle), so they are verified
before they are parsed; a bundle without them loads and serves as before (no cold head: new items not scored).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from model.cold_head import BlockFeaturizer, ColdHead, pair_count
from pipeline.errors import DataError

HEAD_JSON, HEAD_TENSORS = "cold_head.json", "cold_head.pt"
FILES = (HEAD_JSON, HEAD_TENSORS)
RETRAIN = "retrain the model (`recsys train`) or re-save the bundle with this code"


def dump_cold_head(head: ColdHead) -> dict[str, bytes]:
    """The head's two files' bytes, by name."""
    state: dict[str, torch.Tensor] = {}
    for b, z in zip(head.blocks, head.warm_rows, strict=True):
        z = sp.csr_matrix(z, dtype=np.float32)
        state[f"{b.name}/indptr"] = torch.from_numpy(np.asarray(z.indptr, np.int64))
        state[f"{b.name}/indices"] = torch.from_numpy(np.asarray(z.indices, np.int64))
        state[f"{b.name}/data"] = torch.from_numpy(np.asarray(z.data, np.float32))
    if head.k_diag is not None:
        state["k_diag"] = torch.from_numpy(np.asarray(head.k_diag, np.float64))
    buf = io.BytesIO()
    torch.save(state, buf)
    meta = {"kind": head.kind, "n_items": head.n_items, "blocks": [b.to_json() for b in head.blocks],
            "mu": [float(m) for m in head.mu], "delta": head.delta, "second_order": head.second_order,
            "max_pairs_blocks": head.max_pairs_blocks, "ab": head.ab, "l2": head.l2, "neighbours": head.neighbours}
    return {HEAD_JSON: json.dumps(meta).encode(), HEAD_TENSORS: buf.getvalue()}


def load_cold_head(d: Path, n_items: int, read_checked: Callable[[str], bytes]) -> ColdHead:
    """The head from the bundle folder `d` (files read through `read_checked`, which verifies their checksums);
    a DataError naming the file for anything malformed."""
    raw_meta, raw_state = read_checked(HEAD_JSON), read_checked(HEAD_TENSORS)  # checksums first
    try:
        meta = json.loads(raw_meta)
    except ValueError as e:
        raise DataError(f"model bundle file {d / HEAD_JSON} is not readable JSON ({e})", RETRAIN) from e
    try:
        state = torch.load(io.BytesIO(raw_state), map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError, EOFError...
        raise DataError(f"model bundle file {d / HEAD_TENSORS} is not a weights-only state dict "
                        f"({type(e).__name__})", RETRAIN) from e
    try:
        return _rebuild(meta, state, n_items)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DataError(f"model bundle cold head in {d} is malformed ({type(e).__name__}: {str(e)[:160]})", RETRAIN) from e


def _rebuild(meta: dict[str, Any], state: dict[str, torch.Tensor], n_items: int) -> ColdHead:
    if not isinstance(meta, dict) or not isinstance(state, dict) or \
            not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("not an object and a mapping of tensors")
    if meta["kind"] not in ("marec", "eq5") or meta["n_items"] != n_items:
        raise ValueError(f"kind {meta['kind']!r}, {meta['n_items']} items for a model of {n_items}")
    blocks = [BlockFeaturizer.from_json(b) for b in meta["blocks"]]
    rows = []
    for b in blocks:
        indptr, indices = state[f"{b.name}/indptr"].numpy(), state[f"{b.name}/indices"].numpy()
        data = state[f"{b.name}/data"].numpy().astype(np.float32)
        if len(indptr) != n_items + 1 or len(indices) != len(data) or indptr[-1] != len(data) or \
                (len(indices) and (indices.min() < 0 or indices.max() >= len(b.vocab))) or np.any(np.diff(indptr) < 0):
            raise ValueError(f"block {b.name!r}'s rows do not fit {n_items} items x {len(b.vocab)} values")
        rows.append(sp.csr_matrix((data, indices, indptr), shape=(n_items, len(b.vocab))))
    mu = np.asarray([float(m) for m in meta["mu"]], np.float64)
    if len(mu) != pair_count(len(blocks), bool(meta["second_order"]), int(meta["max_pairs_blocks"])) or \
            not np.isfinite(mu).all():
        raise ValueError("mu does not match the blocks")
    k_diag = state["k_diag"].numpy().astype(np.float64) if "k_diag" in state else None
    nums = (float(meta["delta"]), float(meta["ab"]), float(meta["l2"]))
    if not all(math.isfinite(v) and v >= 0 for v in nums):
        raise ValueError("delta, ab and l2 must be finite and non-negative")
    neighbours = meta.get("neighbours", 0)  # bundles saved before the option: the dense S they were fitted with
    if not isinstance(neighbours, int) or isinstance(neighbours, bool) or neighbours < 0:
        raise ValueError(f"neighbours must be an integer >= 0, got {neighbours!r}")
    return ColdHead(meta["kind"], blocks, rows, mu, nums[0], bool(meta["second_order"]), int(meta["max_pairs_blocks"]),
                    nums[1], nums[2], k_diag, neighbours)
