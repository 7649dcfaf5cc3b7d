"""The weekly job's cold-head tuning (model.cold_head_tuning) measured on real cold titles (issue 29).

For each seed, the cold-start protocol's split (pipeline.research.cold_start: 20% of the titles with metadata
cold, their clicks removed; the same split as the docs/results.md cold-start tables) and the metadata-only head
the autoencoders serve ("eq5", x_u · S). Two heads, both fitted on the warm training clicks only:
- fixed: ColdHeadConfig's δ = 10 and the dense similarity (neighbours = 0), what the job used before tuning;
- tuned: δ and neighbours chosen by `tune_cold_head` on titles held out of those training clicks (the real cold
  titles play no part in the choice).
Both rank the cold-test titles for the users who clicked one (cold-only candidates, as the research tables).
`--ease-l2 λ1`: the EASE head instead (MARec's column S − λ1 K S, K over the warm training clicks).
Prints one JSON line per seed (the choice, its grid, both heads' test metrics); nothing is appended.

    RECSYS_DATA_DIR=../shared/data python -m bench.cold_head_tuning --dataset anime --seeds 3
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp


def _plain(v: Any) -> Any:
    if v is None or (isinstance(v, float) and v != v):
        return None
    return v.tolist() if hasattr(v, "tolist") else v


def rank_cold_test(cfg: Any, split: Any, users: np.ndarray, items: dict[str, list[Any]],
                   xk: np.ndarray | None = None, l2: float = 0.0) -> dict[str, float]:
    """The head of `cfg` on the split's warm training clicks ranks the cold-test titles (metrics of cold_start);
    with `xk` (the users' x_u K, K = (XᵀX + λ1 I)⁻¹) MARec's column S − λ1 K S, as the EASE head scores."""
    from model.cold_head import MetadataOnly, build_cold_head
    from model.marec import item_counts
    from pipeline.research.cold_start import metrics

    ct = split.cold_test_items
    head = build_cold_head(MetadataOnly(), split.train, items, cfg)
    s = head.similarity([r[ct] for r in head.warm_rows], exclude=np.flatnonzero(item_counts(split.train) == 0))
    scores = np.asarray(split.train[users] @ s, dtype=np.float32)
    if xk is not None:
        scores -= np.float32(l2) * (xk @ s)
    return {k: round(v, 4) for k, v in metrics(scores, split.cold_test[users][:, ct]).items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", required=True)
    p.add_argument("--data-dir", type=Path, default=Path(os.environ.get("RECSYS_DATA_DIR", "../shared/data")))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--min-item-users", type=int, default=1, help="as the cold-start protocol's option (lastfm: 2)")
    p.add_argument("--ease-l2", type=float, default=None,
                   help="the EASE head instead (MARec's column S − λ1 K S) with this λ1; default: the autoencoders' head")
    a = p.parse_args(argv)

    from model.cold_head import ColdHeadConfig, ColdHeadTuning
    from model.cold_head_tuning import tune_cold_head
    from model.ease import _spd_inverse_inplace, gram_dense
    from pipeline.data.dataset import resolve_dataset
    from pipeline.data.items import read_items
    from pipeline.research.cold_start import ColdStartJob, cold_split, load

    job = ColdStartJob(dataset=a.dataset, data_dir=a.data_dir, out=Path("unused"), min_item_users=a.min_item_users)
    data, _, names = load(job)
    frame = read_items(resolve_dataset(a.dataset, a.data_dir).parent / "items.parquet").to_pandas().set_index("item_id")
    items = {c: [_plain(v) for v in frame[c].reindex(data.item_ids)] for c in sorted({n.split(":")[0] for n in names})}
    base = ColdHeadConfig(blocks=tuple(names), tune=None)
    for seed in range(a.seeds):
        split = cold_split(data.matrix, seed)
        ct = split.cold_test_items
        users = np.flatnonzero((split.cold_test[:, ct].getnnz(axis=1) > 0) & (split.train.getnnz(axis=1) > 0))

        t0 = time.perf_counter()
        t = tune_cold_head(split.train, items, base, ColdHeadTuning(seed=seed), a.ease_l2)
        seconds = time.perf_counter() - t0
        tuned = base.model_copy(update={"delta": t.delta, "neighbours": t.neighbours})
        xk, l2 = None, float(a.ease_l2 or 0.0)
        if a.ease_l2 is not None:
            g = gram_dense(sp.csr_matrix(split.train, dtype=np.float32), np.dtype(np.float32))
            g[np.diag_indices_from(g)] += l2
            xk = np.asarray(split.train[users] @ _spd_inverse_inplace(g), dtype=np.float32)
        print(json.dumps({"dataset": a.dataset, "seed": seed, "head": "ease" if xk is not None else "eq5", "l2": a.ease_l2,
                          "tuned": t.summary(), "tune_seconds": round(seconds, 1), "grid": t.rows,
                          "fixed_test": rank_cold_test(base, split, users, items, xk, l2),
                          "tuned_test": rank_cold_test(tuned, split, users, items, xk, l2)}), flush=True)


if __name__ == "__main__":
    main()
