"""make bench-ease: EASE fit time and peak memory on a real data set (default gowalla, 41k items).

Peak memory is the process's max RSS (ru_maxrss) measured in a fresh subprocess per data set, so one
fit's allocations cannot hide another's. The reference in the same run is the textbook dense path
(np.linalg.inv on the dense Gram, then B = -P / diag(P)), run when the catalog is at most --reference-items
(it holds three dense I x I arrays at once). With --device cuda the fit runs on the GPU (peak GPU memory from
torch.cuda.max_memory_allocated) and the reference is torch.linalg.inv of the dense Gram on the same GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def fit_once(dataset: str, data_dir: Path, dtype: str, textbook: bool, device: str) -> dict[str, float]:
    import torch

    from model.ease import EASEConfig, ease_weights
    from pipeline.data.dataset import BinarizeRule, load_dataset

    x = load_dataset(dataset, data_dir, BinarizeRule()).matrix
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    cuda = device == "cuda"
    if cuda:
        torch.zeros(1, device="cuda")  # context creation is not part of the fit
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if textbook and cuda:
        g = torch.from_numpy((x.T @ x).toarray().astype(dtype)).to("cuda")
        g.diagonal().add_(500.0)
        p = torch.linalg.inv(g)
        b = p / -torch.diagonal(p)
        b.fill_diagonal_(0.0)
        torch.cuda.synchronize()
    elif textbook:
        g = (x.T @ x).toarray().astype(dtype)
        g[np.diag_indices_from(g)] += 500.0
        p = np.linalg.inv(g)
        b = p / -np.diag(p)
        np.fill_diagonal(b, 0.0)
    else:
        b = ease_weights(x, EASEConfig(l2=500.0, dtype=dtype), device)
        assert isinstance(b, torch.Tensor)
        if cuda:
            torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    gpu_peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    return {"gpu_peak_gib": gpu_peak, "users": x.shape[0], "items": x.shape[1], "nnz": x.nnz, "seconds": seconds,
            "peak_gib": peak, "baseline_gib": before}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dataset", default="gowalla")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--data-dir", type=Path, default=Path(os.environ.get("RECSYS_DATA_DIR", "../shared/data")))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--textbook", action="store_true", help="(internal) run the dense np.linalg.inv path")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--reference-items", type=int, default=20_000)
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    if args.child:
        print(json.dumps(fit_once(args.dataset, args.data_dir, args.dtype, args.textbook, args.device)))
        return
    from bench.common import append_row, git_commit, machine, today

    def run(textbook: bool) -> dict[str, float]:
        cmd = [sys.executable, "-m", "bench.ease_fit", "--child", "--dataset", args.dataset, "--dtype", args.dtype,
               "--data-dir", str(args.data_dir), "--device", args.device] + (["--textbook"] if textbook else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    import torch

    cuda = args.device == "cuda"
    ours = run(False)
    gpu = f", peak GPU memory {ours['gpu_peak_gib']:.2f} GiB" if cuda else ""
    print(f"{args.dataset}: {ours['users']:,} users x {ours['items']:,} items; EASE ({args.dtype}, {args.device}) fit "
          f"{ours['seconds']:.1f} s, peak RSS {ours['peak_gib']:.2f} GiB{gpu} "
          f"(one {args.dtype} I x I matrix = {ours['items'] ** 2 * np.dtype(args.dtype).itemsize / 2**30:.2f} GiB)")
    ref = "not run (catalog > --reference-items)"
    if ours["items"] <= args.reference_items or cuda:
        r = run(True)
        ref = f"{r['seconds']:.1f} s, {r['gpu_peak_gib' if cuda else 'peak_gib']:.2f} GiB"
        print(f"textbook dense inverse path: {ref}")
    if cuda:
        if not args.no_record:
            append_row("bench-ease: EASE fit (l2=500, GPU)",
                       ["date", "commit", "machine", "data set", "users x items", "dtype", "fit (s)",
                        "peak GPU memory (GiB)", "textbook torch.linalg.inv on the GPU (same run)"],
                       [today(), git_commit(), machine(torch.device("cuda")), args.dataset,
                        f"{ours['users']:,} x {ours['items']:,}", args.dtype, f"{ours['seconds']:.1f}",
                        f"{ours['gpu_peak_gib']:.2f}", ref])
        return
    if not args.no_record:
        append_row("bench-ease: EASE fit (l2=500, CPU)",
                   ["date", "commit", "machine", "data set", "users x items", "dtype", "fit (s)", "peak RSS (GiB)",
                    "textbook dense inverse (same run)"],
                   [today(), git_commit(), machine(torch.device("cpu")), args.dataset,
                    f"{ours['users']:,} x {ours['items']:,}", args.dtype, f"{ours['seconds']:.1f}",
                    f"{ours['peak_gib']:.2f}", ref])


if __name__ == "__main__":
    main()
