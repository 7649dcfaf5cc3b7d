"""make bench-cold: what scoring the day's new items (pipeline.serving.cold_items) adds to the daily job.

Untimed set-up as bench-infer (bench.infer.write_events: ML-20M-like synthetic histories, Zipf popularity; the
model untrained: its cost to score is the same), plus synthetic metadata: each item 1-3 tags of --tags tags
(Zipf), --new-items new items a day with tags drawn the same way, and a cold head over the catalogue (model.cold_head;
μ fixed and, for EASE, a random diag K: the head's cost does not depend on its values).

Timed in the same run, on the same events: `publish_recommendations` without new items (cold_slots 0), then with
the day's items file, then without again (the two warm runs bracket the cold one; their mean is the reference).
Reported: scoring seconds (the manifest's score_seconds, which includes the merge of the new items) and the cold
run's preparation (reading the items file, encoding, C = the head's columns), end to end seconds, and the
overhead = (cold scoring + preparation) / warm scoring − 1. On a shared machine the runs' own noise can exceed
the effect, so the cold run also times its cold work alone (cold_merge_seconds: x·C, the merge, the counts) and
the row gives (merge + preparation) / (its scoring − merge) too. The issue's target: ≤ 10% at 1M users.
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing as mp
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.infer import DAY, _child

TAGS_PER_ITEM = (1, 4)


def tags_for(n: int, n_tags: int, rng: np.random.Generator) -> list[list[str]]:
    p = 1.0 / np.arange(1, n_tags + 1)
    p /= p.sum()
    return [[f"tag{t}" for t in sorted(set(rng.choice(n_tags, size=int(rng.integers(*TAGS_PER_ITEM)), p=p).tolist()))]
            for _ in range(n)]


def plots_for(tags: list[list[str]]) -> list[str]:
    """A sentence per title from its tags: text for the embedding block to read."""
    return [f"A story of {' and '.join(t)} told by a new voice." for t in tags]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--items", type=int, default=20_108)
    p.add_argument("--new-items", type=int, default=50)
    p.add_argument("--tags", type=int, default=300)
    p.add_argument("--model", default="multivae", choices=["multivae", "ease"])
    p.add_argument("--cold-slots", type=int, default=2)
    p.add_argument("--top-n", type=int, default=100)
    p.add_argument("--memory-budget-mb", type=int, default=512)
    p.add_argument("--precision", default="fp32", choices=["auto", "fp32", "tf32", "bf16"])
    p.add_argument("--workdir", type=Path, default=None, help="keep events here (reused when present)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text", action="store_true", help="also a plot per title, embedded by the sentence model in the "
                                                       "wordllama wheel (block plot:wordllama; its load is timed)")
    p.add_argument("--no-append", action="store_true", help="do not add a row to docs/benchmarks.md")
    args = p.parse_args(argv)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-cold-"))
    events = work / f"events-{args.users}-{args.items}-{args.seed}"
    meta = events.with_name(events.name + ".meta.npz")
    if meta.is_file():
        with np.load(meta) as m0:
            nnz, pop = int(m0["nnz"]), m0["pop"]
    else:
        t = time.perf_counter()
        if events.exists():
            shutil.rmtree(events)
        events.parent.mkdir(parents=True, exist_ok=True)
        ctx = mp.get_context("spawn")
        q: mp.Queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(str(events), args.users, args.items, args.seed, q))
        proc.start()
        nnz, pop = q.get()
        proc.join()
        np.savez(meta, nnz=nnz, pop=pop)
        print(f"events: {args.users:,} users, {nnz:,} interactions written in {time.perf_counter() - t:.0f} s (not timed)")

    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from bench.common import append_row, git_commit, machine, today
    from model import text_encoder
    from model.cold_head import ColdHead, HeadKind, fit_block
    from model.recommenders import make_recommender
    from model.vae import MultiVAE, VAEConfig
    from pipeline.io.bundle import ModelBundle
    from pipeline.io.items import items_uri
    from pipeline.serving.job import InferJob, publish_recommendations

    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    if args.model == "multivae":
        rec = make_recommender("multivae")
        rec.module = MultiVAE(args.items, VAEConfig()).eval()  # type: ignore[attr-defined]
    else:
        rec = make_recommender("ease")
        rec.weights = torch.randn(args.items, args.items) * 1e-3  # type: ignore[attr-defined]
    rec.n_items = args.items
    warm_tags = tags_for(args.items, args.tags, rng)
    blocks = [fit_block("tags", warm_tags)]
    rows = [blocks[0].transform(warm_tags)]
    if args.text:
        warm_plots = plots_for(warm_tags)
        blocks.append(fit_block("plot:wordllama", warm_plots))
        rows.append(blocks[1].transform(warm_plots))
    kind: HeadKind = "marec" if args.model == "ease" else "eq5"
    head = ColdHead(kind, blocks, rows, np.ones(len(blocks)), 10.0, False, 6, 1.0, 500.0,
                    rng.random(args.items) * 1e-3 + 1e-3 if kind == "marec" else None)
    bundle = ModelBundle(rec, np.arange(args.items, dtype=np.int64), pop.astype(np.float32), args.model, {}, "bench",
                         head)
    out = work / "lake"
    folder = Path(items_uri(str(out), dt.date.fromisoformat(DAY)))
    folder.mkdir(parents=True, exist_ok=True)
    new_ids = np.arange(10_000_000, 10_000_000 + args.new_items, dtype=np.int64)
    new_tags = tags_for(args.new_items, args.tags, rng)
    pq.write_table(pa.table({"item_id": new_ids, "title": [f"new {i}" for i in new_ids],
                             "tags": pa.array(new_tags, pa.list_(pa.string())),
                             **({"plot": pa.array(plots_for(new_tags), pa.string())} if args.text else {})}),
                   folder / "items.parquet")
    print(f"machine: {machine(torch.device('cpu'))}", flush=True)

    def run(slots: int) -> tuple[dict[str, Any], float]:
        job = InferJob(date=dt.date.fromisoformat(DAY), events=str(events), out=str(out), top_n=args.top_n, device="cpu",
                       precision=args.precision, memory_budget_mb=args.memory_budget_mb, cold_slots=slots,
                       progress=False)
        t0 = time.perf_counter()
        r = publish_recommendations(job, bundle, "bench")
        return r.manifest(), time.perf_counter() - t0

    warm1, t_w1 = run(0)
    text_encoder._wordllama.cache_clear()  # the daily job is a fresh process: it loads the sentence model
    cold, t_c = run(args.cold_slots)
    warm2, t_w2 = run(0)
    warm_score = (warm1["score_seconds"] + warm2["score_seconds"]) / 2
    prep = cold.get("cold_prepare_seconds", 0.0)
    overhead = (cold["score_seconds"] + prep) / warm_score - 1
    merge = cold.get("cold_merge_seconds", 0.0)  # timed inside the cold run's scoring: immune to the runs' noise
    own = (merge + prep) / (cold["score_seconds"] - merge)
    users = cold["active_users"]
    print(f"{users:,} users x {args.items:,} items ({args.model}, head {kind}), {args.new_items} new items, "
          f"cold_slots {args.cold_slots}: warm scoring {warm1['score_seconds']:.1f} / {warm2['score_seconds']:.1f} s, "
          f"cold scoring {cold['score_seconds']:.1f} s + preparation {prep:.2f} s → overhead {overhead:+.1%}; "
          f"the cold work inside that run: merge {merge:.2f} s + preparation = {own:+.1%} of its warm scoring; "
          f"end to end warm {t_w1:.1f} / {t_w2:.1f} s, cold {t_c:.1f} s; cold items shown {cold['cold_items_shown']}, "
          f"users with one {cold['cold_users']:,}")
    if not args.no_append:
        append_row("bench-cold: scoring the day's new items (cold head) vs warm-only, same run (untrained weights)",
                   ["date", "commit", "machine", "model (head)", "users x items", "interactions", "new items (slots)",
                    "warm scoring s (before / after)", "cold scoring s + preparation s", "overhead vs warm runs",
                    "cold merge s (inside cold scoring)", "cold work / warm scoring (same run)",
                    "end to end s warm / cold", "cold items shown", "users with a cold item"],
                   [today(), git_commit(), machine(torch.device("cpu")),
                    f"{args.model} ({kind}{', tags + plot:wordllama' if args.text else ''})",
                    f"{users:,} x {args.items:,}", f"{nnz:,}", f"{args.new_items} ({args.cold_slots})",
                    f"{warm1['score_seconds']:.1f} / {warm2['score_seconds']:.1f}",
                    f"{cold['score_seconds']:.1f} + {prep:.2f}", f"{overhead:+.1%}", f"{merge:.2f}", f"{own:+.1%}",
                    f"{(t_w1 + t_w2) / 2:.1f} / {t_c:.1f}", f"{cold['cold_items_shown']}", f"{cold['cold_users']:,}"])
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    else:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
