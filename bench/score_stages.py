"""Where one scoring batch goes, stage by stage, in fp32 and in bf16 (issue 30): `python -m bench.score_stages`.

An untrained Multi-VAE 600-200 (as bench.infer) scores one batch of synthetic users (Poisson(--mean-items) items
each). Each stage runs the same code the daily job runs (pipeline.serving.precision, model.topk, model.metrics) and is
timed on its own, best of --repeats; `--tiles` also times the bf16 product + candidate selection with the batch cut
into tiles of that many users. Prints the table with the machine line; nothing is appended.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any


def best_ms(f: Callable[[], Any], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=3217, help="the batch (bench.infer's at a 512 MB budget)")
    p.add_argument("--items", type=int, default=20108)
    p.add_argument("--mean-items", type=float, default=74.0)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--margin", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tiles", type=int, nargs="*", default=[], help="bf16 product + selection in tiles of N users")
    args = p.parse_args(argv)

    import numpy as np
    import scipy.sparse as sp
    import torch

    from bench.common import machine_line
    from model import topk
    from model.metrics import topk_items
    from model.recommenders import make_recommender
    from model.vae import MultiVAE, VAEConfig
    from pipeline.serving import precision

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    n, m = args.users, args.items
    counts = rng.poisson(args.mean_items, n).clip(1, m)
    rows = np.repeat(np.arange(n), counts)
    cols = np.concatenate([rng.choice(m, c, replace=False) for c in counts])
    x_host = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n, m))
    rec = make_recommender("multivae")
    rec.module = MultiVAE(m, VAEConfig()).eval()  # type: ignore[attr-defined]
    rec.n_items = m
    parts = precision.decoder_parts(rec)
    assert parts is not None
    hidden, final = parts
    x, indptr = precision._device_history(x_host, torch.device("cpu"))
    topk.warm()
    c = args.k + args.margin
    times: dict[str, float] = {}
    with torch.no_grad():
        hist = x.batch(torch.arange(n), total=int(indptr[n]))
        h = hidden(hist)
        w, b = final.weight, final.bias
        w16, b16, h16 = w.to(torch.bfloat16), b.to(torch.bfloat16), h.to(torch.bfloat16)
        buf = torch.empty(n, m, dtype=torch.bfloat16)
        times["hidden layers (fp32)"] = best_ms(lambda: hidden(hist), args.repeats)
        item_in = rec.module.item_in  # type: ignore[attr-defined]
        times["  of which the sparse input layer"] = best_ms(lambda: item_in(hist.l2_normalized()), args.repeats)
        f32 = torch.addmm(b, h, w.t())
        times["fp32 product"] = best_ms(lambda: torch.addmm(b, h, w.t(), out=f32), args.repeats)
        times["fp32 top-k"] = best_ms(lambda: topk_items(f32, args.k), args.repeats)
        logits = torch.addmm(b16, h16, w16.t(), out=buf)
        times["bf16 product"] = best_ms(lambda: torch.addmm(b16, h16, w16.t(), out=buf), args.repeats)
        times[f"bf16 candidates (top {c})"] = best_ms(lambda: precision._candidates(logits, c), args.repeats)
        cand = precision._candidates(logits, c)
        times["fp32 re-score of the candidates"] = best_ms(lambda: precision._exact_scores(h, w, b, cand), args.repeats)
        exact = precision._exact_scores(h, w, b, cand)
        times["final order"] = best_ms(lambda: topk_items(exact, args.k), args.repeats)
        for tile in args.tiles:
            def tiled(tile: int = tile) -> None:
                for s in range(0, n, tile):
                    out = buf[s : s + tile]
                    torch.addmm(b16, h16[s : s + tile], w16.t(), out=out)
                    precision._candidates(out, c)
            times[f"bf16 product + candidates, tiles of {tile}"] = best_ms(tiled, args.repeats)
        times["recommend_bf16, whole batch"] = best_ms(
            lambda: precision.recommend_bf16(rec, x_host, args.k, batch_size=n, margin=args.margin), args.repeats)
    print(f"one batch of {n:,} users x {m:,} items ({int(counts.sum()):,} interactions), top-{args.k}; "
          f"{machine_line()}")
    for name, ms in times.items():
        print(f"{name:46s} {ms:8.1f} ms")


if __name__ == "__main__":
    main()
