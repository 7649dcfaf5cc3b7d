"""bf16 against fp32 scoring on real held-out users: top-100 overlap and NDCG@100 of both (issue 30).

Trains Multi-VAE + PIA on a data set of ../shared/data (strong generalization split, seed 0; a few epochs:
the comparison needs a trained model, not a tuned one), then scores the test users' fold-in histories with fp32
(`Recommender.recommend`) and with bf16 candidates + fp32 re-score (pipeline.serving.precision.recommend_bf16),
for each --margin, and bf16 alone (no re-score). `--emulate` computes the bf16 product as bf16-rounded inputs
and output with fp32 products and accumulation (what a native bf16 GEMM does, up to summation order): for CPUs
without bf16, where the real product is ~100x slower. Prints one line per margin; nothing is appended.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="ml-1m-implicit-all")
    p.add_argument("--data-dir", type=Path, default=Path(os.environ.get("RECSYS_DATA_DIR", "../shared/data")))
    p.add_argument("--min-rating", type=float, default=None, help="binarize ratings at >= this (None: every row)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--train-users", type=int, default=None,
                   help="train on this many training users, drawn at random (all items and test users kept): time")
    p.add_argument("--margins", type=int, nargs="+", default=[0, 20, 100])
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--emulate", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from bench.common import machine_line
    from model.recommenders import make_recommender
    from model.split import strong_generalization_split
    from model.train import TrainConfig
    from pipeline.data.dataset import BinarizeRule, load_dataset
    from pipeline.serving.precision import compare_precisions

    data = load_dataset(args.dataset, args.data_dir, BinarizeRule(min_rating=args.min_rating))
    split = strong_generalization_split(data.matrix, seed=args.seed)
    train = split.train
    if args.train_users and args.train_users < train.shape[0]:
        rows = np.sort(np.random.default_rng(args.seed).choice(train.shape[0], args.train_users, replace=False))
        train = train[rows]
    t = time.perf_counter()
    rec = make_recommender("multivae-pia", train=TrainConfig(epochs=args.epochs, device="cpu", seed=args.seed,
                                                             progress=False))
    rec.fit(train, split.valid)
    print(f"{args.dataset}: {data.matrix.shape[0]:,} x {split.n_items:,}, trained {args.epochs} epochs on "
          f"{train.shape[0]:,} users in "
          f"{time.perf_counter() - t:.0f} s; {split.test.n_users:,} test users; {machine_line()}", flush=True)
    keep = split.test.users_with_targets()
    hist, tgt = split.test.fold_in[keep], split.test.targets[keep]
    for margin in args.margins:
        t = time.perf_counter()
        r = compare_precisions(rec, hist, tgt, k=args.k, margin=margin, emulate=args.emulate)
        print(f"margin {margin}: users {int(r['users'])}, top-{args.k} overlap {r['overlap']:.4f} "
              f"(bf16 alone {r['overlap_no_rerank']:.4f}); NDCG@{args.k} fp32 {r['ndcg_fp32']:.5f}, "
              f"bf16+rescore {r['ndcg_bf16']:.5f} (delta {r['ndcg_delta']:+.5f}), bf16 alone "
              f"{r['ndcg_bf16_no_rerank']:.5f}; {'emulated' if args.emulate else 'torch'} bf16; "
              f"{time.perf_counter() - t:.0f} s", flush=True)


if __name__ == "__main__":
    main()
