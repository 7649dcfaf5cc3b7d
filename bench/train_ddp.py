"""make bench-train-ddp: one epoch of Multi-VAE + PIA, data-parallel on N CPU processes (gloo) against 1 process,
on a synthetic ML-20M-shaped matrix (bench/train_epoch.py's generator; --users to take fewer users).

Both sides use the same cores: the single process gets all of them as torch threads, each of the N ranks gets
cores / N threads (on a 2-core machine: 1 process x 2 threads against 2 processes x 1 thread). The ranks are
started with torch.multiprocessing and gloo on 127.0.0.1, not through Spark: this measures the training step
(shard, all-reduce, Adam), not TorchDistributor's launch (about a minute of Spark task, torchrun and interpreter
start-up on a loaded 2-core machine, paid once per job). The epoch is timed inside the trainer's loop (matrix
build, process start and model set-up excluded); the epoch's mean loss is printed for both, as a check that
they trained the same model.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.common import append_row, git_commit, machine, machine_rates, rates_text, today
from model.pia import PIAConfig
from model.train import TrainConfig, Trainer
from model.vae import MultiVAE, VAEConfig
from pipeline.data.synth import synth_ml20m_like_csr


def one_epoch(args: argparse.Namespace) -> dict[str, float]:
    """Seconds of the last of `args.epochs` epochs and its mean loss (this process; data-parallel if a group is up)."""
    x = synth_ml20m_like_csr(args.users, args.items, args.mean_items, seed=0)
    torch.manual_seed(0)
    model = MultiVAE(x.shape[1], VAEConfig())
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch, device="cpu", seed=0, progress=False)
    times: list[float] = []
    last = [0.0]
    records: list[dict] = []

    def tick(record: dict) -> None:
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now
        records.append(record)

    trainer = Trainer(model, x, cfg, PIAConfig(weight=0.1), on_epoch=tick)
    if dist.is_initialized():
        dist.barrier()  # the ranks start the clock together
    last[0] = time.perf_counter()
    trainer.fit()
    return {"seconds": times[-1], "loss": float(records[-1]["loss"]), "nnz": float(x.nnz), "users": float(x.shape[0])}


def rank_main(rank: int, world: int, port: int, threads: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = one_epoch(args)
        if rank == 0:
            Path(out).write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--users", type=int, default=20_000, help="ML-20M has 116,677 (a full epoch is ~6x the default's)")
    p.add_argument("--items", type=int, default=20_108)
    p.add_argument("--mean-items", type=float, default=74)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--epochs", type=int, default=1, help="epochs per side; the last one is reported")
    p.add_argument("--no-record", action="store_true", help="print only; do not append to docs/benchmarks.md")
    args = p.parse_args()
    cores = os.cpu_count() or 1
    per_rank = max(1, cores // args.processes)
    load = os.getloadavg()[0]

    torch.set_num_threads(cores)
    # the machine without its "(N threads)": the thread counts go in their own columns
    host = machine(torch.device("cpu")).rsplit(" (", 1)[0] + "; " + rates_text(machine_rates())
    single = one_epoch(args)
    print(f"1 process x {cores} threads: {single['seconds']:.2f} s/epoch, loss {single['loss']:.4f}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rank0.json")
        mp.spawn(rank_main, args=(args.processes, free_port(), per_rank, args, out), nprocs=args.processes, join=True)
        ddp = json.loads(Path(out).read_text())
    print(f"{args.processes} processes x {per_rank} threads (gloo): {ddp['seconds']:.2f} s/epoch, loss {ddp['loss']:.4f}",
          flush=True)
    ratio = single["seconds"] / ddp["seconds"]
    print(f"speed-up: {ratio:.2f}x (load average at start {load:.1f})", flush=True)
    if not args.no_record:
        flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("no_record",))
        append_row(
            "bench-train-ddp: one epoch of Multi-VAE + PIA, DDP on CPU processes (batch 500)",
            ["date", "commit", "machine", "flags", "matrix", "1 process (s/epoch)", "DDP (s/epoch)", "speed-up",
             "epoch loss 1 process / DDP", "load average at start"],
            [today(), git_commit(), host, f"`{flags}`",
             f"{int(single['users']):,} x {args.items:,}, {int(single['nnz']):,} nnz",
             f"{single['seconds']:.2f} (1 x {cores} threads)",
             f"{ddp['seconds']:.2f} ({args.processes} x {per_rank} threads, gloo)",
             f"{ratio:.2f}x", f"{single['loss']:.4f} / {ddp['loss']:.4f}", f"{load:.1f}"],
        )


if __name__ == "__main__":
    main()
