"""make bench-infer: daily batch inference end to end on an ML-20M-shaped model and synthetic users.

Untimed set-up: events Parquet for --users users with ML-20M-like histories (pipeline.data.synth, 74 items per
user on average, Zipf popularity), written in a child process (so its memory is not counted), and an
untrained Multi-VAE of the reference architecture (I -> 600 -> 2x200 -> 600 -> I; untrained weights cost the
same to score). Timed: `pipeline.serving.job.publish_recommendations` (events Parquet -> histories -> scores,
seen masked, top N -> checks -> Parquet published). Reported: users/s end to end and for scoring alone, peak RSS of this process,
the machine (bench.common.machine: CPU model, family/model, CPUs, bf16 flags) with its fp32 and bf16 matmul rates
at the calibration shape, and the dense matmul FLOP/s of the precision actually used (the run's manifest says
which, and why) at the decoder's shape, measured in the same run, so that scoring efficiency = achieved model
FLOP/s / matmul FLOP/s of that precision. Where the CPU has no bf16 instructions bf16 is emulated, its rate depends on the shape
(0.1-1.5 GFLOP/s on a Zen 3 EPYC) and would take minutes to measure at the decoder's: no efficiency is reported.
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing as mp
import resource
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

CHUNK = 1_000_000  # users generated and written per events file
DAY = "2024-05-03"


def write_events(directory: str, n_users: int, n_items: int, seed: int) -> tuple[int, np.ndarray]:
    """Events files under directory/dt=DAY/; returns (interactions, item popularity)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data.synth import synth_ml20m_like_csr

    part = Path(directory) / f"dt={DAY}"
    part.mkdir(parents=True, exist_ok=True)
    nnz, pop = 0, np.zeros(n_items, np.float64)
    for i, start in enumerate(range(0, n_users, CHUNK)):
        m = synth_ml20m_like_csr(min(CHUNK, n_users - start), n_items, seed=seed + i)
        users = np.repeat(np.arange(start, start + m.shape[0], dtype=np.int64), np.diff(m.indptr))
        pq.write_table(pa.table({"user_id": users, "item_id": m.indices.astype(np.int64)}),
                       part / f"part-{i:05d}.parquet", row_group_size=1 << 20)
        nnz += m.nnz
        pop += np.bincount(m.indices, minlength=n_items)
    return nnz, pop


def _child(directory: str, n_users: int, n_items: int, seed: int, q: mp.Queue) -> None:
    q.put(write_events(directory, n_users, n_items, seed))


def matmul_flops(batch: int, hidden: int, n_items: int, device: object, seconds: float = 3.0,
                 precision: str = "fp32") -> float:
    """Dense FLOP/s of torch.mm([batch, hidden] x [hidden, n_items]) (the decoder's output layer) at the
    precision the scoring runs at."""
    import torch

    from pipeline.serving.scoring import scoring_precision

    if precision == "bf16" and torch.device(str(device)).type == "cpu":  # the CPU bf16 path: a bf16 product
        return _mm_rate(batch, hidden, n_items, device, seconds, torch.bfloat16)
    with scoring_precision(precision, str(device)) as chosen:
        dtype = torch.bfloat16 if chosen == "bf16" else torch.float32
        return _mm_rate(batch, hidden, n_items, device, seconds, dtype)


def _mm_rate(batch: int, hidden: int, n_items: int, device: object, seconds: float, dtype: object) -> float:
    import torch

    a = torch.randn(batch, hidden, device=device, dtype=dtype)  # type: ignore[call-overload]
    b = torch.randn(hidden, n_items, device=device, dtype=dtype)  # type: ignore[call-overload]
    out = torch.empty(batch, n_items, device=device, dtype=dtype)  # type: ignore[call-overload]
    torch.mm(a, b, out=out)
    sync = torch.cuda.synchronize if out.is_cuda else (lambda: None)
    sync()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b, out=out)
        reps += 1
    sync()
    return 2.0 * batch * hidden * n_items * reps / (time.perf_counter() - t0)


class RssSampler:
    """RSS of this process every `every` seconds in a daemon thread: shows whether memory creeps over shards."""

    def __init__(self, every: float) -> None:
        self.samples: list[float] = []
        self.done = threading.Event()
        self.every = every
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        from bench.common import rss_gib

        while not self.done.is_set():
            self.samples.append(rss_gib())
            self.done.wait(self.every)

    def report(self) -> None:
        self.done.set()
        tenths = np.array_split(np.array(self.samples), 10)
        print("RSS by tenth of the run (GiB, median/max): "
              + ", ".join(f"{np.median(t):.2f}/{t.max():.2f}" for t in tenths if len(t)))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--items", type=int, default=20_108)
    p.add_argument("--top-n", type=int, default=100)
    p.add_argument("--memory-budget-mb", type=int, default=512)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "tf32", "bf16"])
    p.add_argument("--parallel-shards", type=int, default=None,
                   help="shards prepared and published concurrently (default: one per 4 CPU cores)")
    p.add_argument("--workdir", type=Path, default=None, help="keep events here (reused when present)")
    p.add_argument("--shard-events", type=int, default=None, help="events per shard (default: from the budget)")
    p.add_argument("--rss-every", type=float, default=None,
                   help="sample RSS every S seconds and print its median and max by tenth of the run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-append", action="store_true", help="do not add a row to docs/benchmarks.md")
    p.add_argument("--events-only", action="store_true", help="write the events (into --workdir) and stop")
    args = p.parse_args(argv)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-infer-"))
    events = work / f"events-{args.users}-{args.items}-{args.seed}"
    t = time.perf_counter()
    meta = events.with_name(events.name + ".meta.npz")  # written last: present means the events are complete
    if meta.is_file():
        with np.load(meta) as m0:
            nnz, pop = int(m0["nnz"]), m0["pop"]
        print(f"events: {args.users:,} users, {nnz:,} interactions reused from {events} (not timed)")
    else:
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
    if args.events_only:
        return

    import torch

    from bench.common import append_row, git_commit, machine, machine_rates, rates_text, today
    from model.recommenders import make_recommender
    from model.train import resolve_device
    from model.vae import MultiVAE, VAEConfig
    from pipeline.io.bundle import ModelBundle
    from pipeline.io.hardware import read_cpuinfo
    from pipeline.serving.job import InferJob, publish_recommendations
    from pipeline.serving.sizing import batch_size_for

    device = resolve_device(args.device)
    rec = make_recommender("multivae")
    rec.module = MultiVAE(args.items, VAEConfig()).eval()  # type: ignore[attr-defined]
    rec.n_items = args.items
    bundle = ModelBundle(rec, np.arange(args.items, dtype=np.int64), pop.astype(np.float32), "multivae", {}, "bench")
    batch = batch_size_for(args.items, args.top_n, args.memory_budget_mb)
    rates = machine_rates() if device.type == "cpu" else None
    print(f"machine: {machine(torch.device(device))}" + (f"; {rates_text(rates)}" if rates else ""), flush=True)
    out = work / "lake"
    job = InferJob(date=dt.date.fromisoformat(DAY), events=str(events), out=str(out), top_n=args.top_n,
                   device=args.device, precision=args.precision, memory_budget_mb=args.memory_budget_mb,
                   parallel_shards=args.parallel_shards, shard_events=args.shard_events)
    sampler = RssSampler(args.rss_every) if args.rss_every else None
    t0 = time.perf_counter()
    result = publish_recommendations(job, bundle, "bench")
    if sampler is not None:
        sampler.report()
    total = time.perf_counter() - t0
    m = result.manifest()  # the run's details: shards, phase and scoring seconds
    used = m["precision"]  # what the run used (auto decides by capability): the reference is that precision's rate
    emulated_bf16 = used == "bf16" and device.type == "cpu" and not read_cpuinfo().bf16_flags
    # the reference after the run and again, keeping the faster: a noisy neighbour during either measurement would
    # otherwise inflate the efficiency (it read 123% once when the first measurement was slowed)
    if emulated_bf16:  # no meaningful reference: emulated bf16's rate depends on the shape (0.1-1.5 GFLOP/s here)
        mm_before = mm_after = float("nan")
    else:
        mm_before = matmul_flops(batch, 600, args.items, device, precision=used)
        mm_after = matmul_flops(batch, 600, args.items, device, precision=used)
    mm = max(mm_before, mm_after)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    users = m["active_users"]
    per_user = 2 * (nnz / users * 600 + 600 * 400 + 200 * 600 + 600 * args.items)  # model FLOPs per user
    score_rate = users / m["score_seconds"]
    eff = per_user * score_rate / mm
    print(f"batch {batch}, {m['shards']} shards, {m['parallel_shards']} in flight: "
          f"end to end {total:.1f} s = {users / total:,.0f} users/s; "
          f"scoring {m['score_seconds']:.1f} s = {score_rate:,.0f} users/s = {per_user * score_rate / 1e9:.1f} GFLOP/s; "
          f"matmul {mm / 1e9:.1f} GFLOP/s (before {mm_before / 1e9:.1f}, after {mm_after / 1e9:.1f}); "
          f"efficiency {eff:.0%}; peak RSS {rss:.2f} GiB")
    ph = m["phase_seconds"]
    print(f"precision {used}: {m['precision_reason']}")
    print("phases (busy s): " + ", ".join(f"{k} {v:.2f}" for k, v in ph.items()))
    # what a faster scorer cannot remove: the main thread's time outside scoring
    outside = ph["spill"] + ph["wait_histories"] + ph["wait_publish"]
    print(f"main thread outside scoring: {outside:.2f} s (spill {ph['spill']:.2f}, waiting for histories "
          f"{ph['wait_histories']:.2f}, waiting for publishing {ph['wait_publish']:.2f})")
    if not args.no_append:
        append_row("bench-infer: daily batch inference by precision (Multi-VAE 600/200, top-100, untrained weights)",
                   ["date", "commit", "machine", "machine matmul rates (same run)", "users x items", "interactions",
                    "precision (requested → used)", "batch (budget)", "end to end (s)", "users/s end to end",
                    "users/s scoring", "matmul GFLOP/s of the precision used", "scoring efficiency", "peak RSS (GiB)"],
                   [today(), git_commit(), machine(torch.device(device)), rates_text(rates) if rates else "n/a (GPU)",
                    f"{users:,} x {args.items:,}", f"{nnz:,}", f"{args.precision} → {used}",
                    f"{batch} ({args.memory_budget_mb} MB, P={m['parallel_shards']})",
                    f"{total:.1f}", f"{users / total:,.0f}", f"{score_rate:,.0f}",
                    "not measured (bf16 emulated)" if emulated_bf16 else f"{mm / 1e9:.1f}",
                    "n/a (bf16 emulated)" if emulated_bf16 else f"{eff:.0%}", f"{rss:.2f}"])
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    else:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
