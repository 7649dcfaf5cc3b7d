"""make bench-train: one epoch of Multi-VAE + PIA on a synthetic ML-20M-shaped matrix, two ways.

- this project: `model.train.Trainer` (CSR kept on the device, sparse first layer, sparse NLL gather);
- the common reference data path: each batch sliced from a scipy CSR, densified on the CPU, copied to
  the device, through a dense nn.Linear Multi-VAE (the usual PyTorch port of Liang et al.) with the same
  PIA term computed from the dense batch.
Same architecture (I -> 600 -> 2x200 -> 600 -> I), batch 500, Adam 1e-3, PIA closed form.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn
from torch.nn import functional as F

from bench.common import append_row, git_commit, machine_line, today
from model.pia import PIAConfig
from model.train import TrainConfig, Trainer, resolve_device
from model.vae import MultiVAE, VAEConfig
from pipeline.data.synth import synth_ml20m_like_csr


class DenseMultiVAE(nn.Module):
    """The common dense implementation (reference path)."""

    def __init__(self, n_items: int, hidden: int = 600, latent: int = 200):
        super().__init__()
        self.enc = nn.ModuleList([nn.Linear(n_items, hidden), nn.Linear(hidden, 2 * latent)])
        self.dec = nn.ModuleList([nn.Linear(latent, hidden), nn.Linear(hidden, n_items)])
        self.anchors = nn.Parameter(torch.randn(n_items, latent) * 0.01)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor, beta: float, lam: float) -> torch.Tensor:
        h = self.drop(F.normalize(x))
        h = self.enc[1](torch.tanh(self.enc[0](h)))
        mu, logvar = h.chunk(2, dim=-1)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        logits = self.dec[1](torch.tanh(self.dec[0](z)))
        nll = -(F.log_softmax(logits, -1) * x).sum(-1).mean()
        kl = (-0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=-1)).mean()
        xb = (x > 0).float()
        cnt = xb.sum(-1, keepdim=True).clamp_min(1)
        c = xb @ self.anchors / cnt
        spread = (xb @ (self.anchors * self.anchors).sum(-1, keepdim=True) / cnt)[:, 0] - (c * c).sum(-1)
        la = ((mu - c).pow(2).sum(-1) + logvar.exp().sum(-1) + spread).mean()
        return nll + beta * kl + lam * la


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reference_epoch(x: sp.csr_matrix, device: torch.device, batch: int, seed: int, epochs: int = 1) -> list[float]:
    """Seconds of each of `epochs` epochs of the reference path."""
    torch.manual_seed(seed)
    model = DenseMultiVAE(x.shape[1]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(seed)
    times = []
    step = 0
    for _ in range(epochs):
        order = rng.permutation(x.shape[0])
        sync(device)
        t0 = time.perf_counter()
        for start in range(0, x.shape[0], batch):
            xb = torch.from_numpy(x[order[start : start + batch]].toarray()).to(device)
            loss = model(xb, beta=min(0.2, step / 200_000), lam=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def project_epoch(x: sp.csr_matrix, device: torch.device, batch: int, seed: int, bf16: bool,
                  epochs: int = 1, profile: bool = False, cuda_graph: bool = False) -> list[float]:
    """Seconds of each of `epochs` epochs (the first one includes CUDA/allocator warm-up)."""
    torch.manual_seed(seed)
    model = MultiVAE(x.shape[1], VAEConfig())
    cfg = TrainConfig(epochs=epochs, batch_size=batch, device=str(device), seed=seed, bf16=bf16, progress=True,
                      cuda_graph=cuda_graph)
    times: list[float] = []
    last = [0.0]

    def tick(_record: dict) -> None:
        sync(device)
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    trainer = Trainer(model, x, cfg, PIAConfig(weight=0.1), on_epoch=tick)
    sync(device)
    last[0] = time.perf_counter()
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as prof
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with prof(activities=acts) as pr:
            trainer.fit()
        key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        print(pr.key_averages().table(sort_by=key, row_limit=25), flush=True)
    else:  # bf16: the trainer's own autocast of the step (CUDA or CPU)
        trainer.fit()
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--users", type=int, default=116_677)
    p.add_argument("--items", type=int, default=20_108)
    p.add_argument("--mean-items", type=float, default=74)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--device", default="auto")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast of this project's training step (the "
                   "trainer's own, CUDA or CPU)")
    p.add_argument("--cuda-graph", action="store_true", help="replay each step as one CUDA graph (model.graph_step)")
    p.add_argument("--epochs", type=int, default=1,
                   help="epochs of this project's trainer; the last one is reported (>1 excludes warm-up)")
    p.add_argument("--profile", action="store_true", help="print torch.profiler's top ops (not recorded)")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--no-record", action="store_true", help="print only; do not append to docs/benchmarks.md")
    args = p.parse_args()
    device = resolve_device(args.device)
    named = machine_line(device)  # model string, flags, and (CPU) fp32/bf16 matmul rates measured now
    t0 = time.perf_counter()
    x = synth_ml20m_like_csr(args.users, args.items, args.mean_items, seed=0)
    print(f"matrix {x.shape[0]:,} x {x.shape[1]:,}, {x.nnz:,} interactions ({x.nnz / x.shape[0]:.1f}/user), "
          f"built in {time.perf_counter() - t0:.1f}s; device {named}", flush=True)
    times = project_epoch(x, device, args.batch, 0, args.bf16, args.epochs, args.profile, args.cuda_graph)
    ours = times[-1]
    print(f"this project: {ours:.3f} s/epoch (epochs: {', '.join(f'{t:.3f}' for t in times)})", flush=True)
    ref_times = [float("nan")] if args.skip_reference else reference_epoch(x, device, args.batch, 0, args.epochs)
    ref = ref_times[-1]
    print(f"reference path: {ref:.3f} s/epoch (epochs: {', '.join(f'{t:.3f}' for t in ref_times)})", flush=True)
    ratio = ref / ours
    print(f"speed-up: {ratio:.2f}x", flush=True)
    if not args.no_record:
        append_row(
            "bench-train: one epoch of Multi-VAE + PIA (batch 500)",
            ["date", "commit", "machine", "matrix", "precision", "this project (s/epoch)",
             "reference path (s/epoch)", "speed-up"],
            [today(), git_commit(), named, f"{x.shape[0]:,} x {x.shape[1]:,}, {x.nnz:,} nnz",
             ("bf16 autocast (the step)" if args.bf16 else "fp32")
             + (", CUDA graph" if args.cuda_graph else ""),
             f"{ours:.3f}" + (f" (epoch {len(times)} of {len(times)})" if len(times) > 1 else ""),
             "not run (--skip-reference)" if args.skip_reference else f"{ref:.2f}",
             "n/a" if args.skip_reference else f"{ratio:.2f}x"],
        )


if __name__ == "__main__":
    main()
