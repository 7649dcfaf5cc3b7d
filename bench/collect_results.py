"""Concatenate the per-data-set results.md files under OUT into docs/results.md, with a header."""

from __future__ import annotations

import json
import sys
from pathlib import Path

HEADER = """# Results: strong-generalization evaluation

Produced by `make results` (bench/results.sh → `recsys experiment` per data set), then this file is assembled
by bench/collect_results.py. Protocol (../shared/ARCHITECTURE.md): binarize (ratings >= 4 where a rating
exists), keep users with >= 5 interactions, per seed one user split (10% validation, 10% test users, the rest
train), 80/20 fold-in/targets for held-out users, all non-fold-in items ranked. The epoch and every
hyperparameter (EASE l2, PIA λ_A) are chosen on validation users only; test users are scored once per seed.
Values are mean ± sample std over seeds (each seed: a different split and a different initialization).

The paper's ML-20M numbers (Recall@20 / Recall@50 / NDCG@100): Multi-VAE 0.398 / 0.537 / 0.426,
Multi-VAE+PIA 0.408 / 0.546 / 0.437, RecVAE 0.414 / 0.553 / 0.442, RecVAE+PIA 0.417 / 0.556 / 0.446.
ML-20M is not available here; these data sets are smaller and sparser, so absolute values differ.
"""


def main(out: Path, doc: Path) -> None:
    parts = [HEADER]
    for sub in sorted(p for p in out.iterdir() if (p / "results.md").exists()):
        res = json.loads((sub / "results.json").read_text())
        parts.append((sub / "results.md").read_text())
        parts.append(f"Command: `recsys experiment --dataset {res['dataset']} ...` (see bench/results.sh).\n")
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(parts))
    print(f"wrote {doc}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
