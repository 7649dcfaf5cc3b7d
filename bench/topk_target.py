"""The numba top-k kernels compiled for the host CPU against portable targets, and the images' cache that holds
both (issue 30): `python -m bench.topk_target` (`make bench-topk-target` appends the rows).

numba keys its on-disk cache by the CPU it compiled for (LLVM's name and features). An image whose cache was built
on one CPU model and run on another compiles both kernels again at every job start. For each target a fresh
process with an empty cache compiles the kernels; a second process with the same cache loads them; both time
topk_rows on one scoring batch (fp32 top-k and the bf16 candidates), best of --repeats. A third process tells
numba it runs on another CPU (`--pretend-cpu`: another LLVM name and feature set, what a job on a different
machine sees) and shows whether the cache still loads. The last row is the scoring images' own cache
(pipeline.io.numba_target.build: the host's kernels and the portable ones), with the entry points' guard choosing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# the targets compared: None = numba's default, the host CPU; "generic" = baseline x86-64 (no SIMD beyond SSE2)
TARGETS: dict[str, tuple[str, str] | None] = {
    "host": None,
    "generic": ("generic", ""),
    "x86-64-v3": ("x86-64-v3", ""),
    "x86-64-v4": ("x86-64-v4", ""),
}
# a CPU no machine of ours reports, whose instructions every x86-64 CPU runs
PRETEND_CPU, PRETEND_FEATURES = "x86-64-v2", "+sse2,+sse4.2"
SECTION = "bench-topk-target: the numba top-k kernels' compile target (portable cache)"


def target_env(target: tuple[str, str] | None, cache_dir: Path) -> dict[str, str]:
    """The child's environment: the pinned target (or none), its own numba cache directory."""
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES")}
    env["NUMBA_CACHE_DIR"] = str(cache_dir)
    if target is not None:
        env["NUMBA_CPU_NAME"], env["NUMBA_CPU_FEATURES"] = target
    return env


class _Features(dict):  # type: ignore[type-arg]
    """Another CPU's feature map, as llvmlite's get_host_cpu_features returns it."""

    def flatten(self) -> str:
        return PRETEND_FEATURES


def child(out: Path, users: int, items: int, k: int, margin: int, repeats: int, pretend_cpu: str | None,
          guard: bool) -> None:
    """Runs in its own process (numba reads its target when imported): compile or load, then time the kernels."""
    if pretend_cpu:  # what numba (and the guard) read of the host: another CPU's name and features
        import llvmlite.binding as ll
        ll.get_host_cpu_name = lambda: pretend_cpu
        ll.get_host_cpu_features = _Features
    chose = None
    if guard:
        from pipeline.io import numba_target
        chose = numba_target.guard()
    t0 = time.perf_counter()
    import torch

    from model import topk
    t1 = time.perf_counter()
    topk.warm()
    t2 = time.perf_counter()
    stats = [topk._topk_f32.stats, topk._topk_bf16.stats]
    hits = sum(sum(s.cache_hits.values()) for s in stats)
    misses = sum(sum(s.cache_misses.values()) for s in stats)
    torch.manual_seed(0)
    f32 = torch.randn(users, items)
    b16 = f32.to(torch.bfloat16)
    best = {"fp32": float("inf"), "bf16": float("inf")}
    for _ in range(repeats):
        for name, scores, n in (("fp32", f32, k), ("bf16", b16, k + margin)):
            t = time.perf_counter()
            topk.topk_rows(scores, n)
            best[name] = min(best[name], time.perf_counter() - t)
    out.write_text(json.dumps({"import_s": t1 - t0, "warm_s": t2 - t1, "cache_hits": hits, "cache_misses": misses,
                               "fp32_ms": best["fp32"] * 1e3, "bf16_ms": best["bf16"] * 1e3, "guard": chose,
                               "cpu_name": os.environ.get("NUMBA_CPU_NAME")}))


def run_child(target: tuple[str, str] | None, cache_dir: Path, args: argparse.Namespace,
              pretend_cpu: str | None = None, guard: bool = False) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "bench.topk_target", "--child", str(out), "--users", str(args.users),
               "--items", str(args.items), "--k", str(args.k), "--margin", str(args.margin),
               "--repeats", str(args.repeats)] + (["--pretend-cpu", pretend_cpu] if pretend_cpu else []) + \
            (["--guard"] if guard else [])
        subprocess.run(cmd, env=target_env(target, cache_dir), check=True, cwd=Path(__file__).resolve().parent.parent)
        result: dict[str, Any] = json.loads(out.read_text())
        return result


def image_cache(cache_dir: Path, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """The images' cache (both kernels and the build CPU's record) in `cache_dir`, then a job on this CPU and one on
    another, each through the entry points' guard."""
    from pipeline.io import numba_target

    build_env = target_env(None, cache_dir)
    t = time.perf_counter()
    numba_target.build(build_env)
    built_s = time.perf_counter() - t
    same = run_child(None, cache_dir, args, guard=True)
    other = run_child(None, cache_dir, args, pretend_cpu=PRETEND_CPU, guard=True)
    return same | {"build_s": built_s}, other


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", nargs="*", default=list(TARGETS), choices=list(TARGETS))
    p.add_argument("--users", type=int, default=3217, help="one scoring batch (bench.infer's at a 512 MB budget)")
    p.add_argument("--items", type=int, default=20108)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--margin", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--append", action="store_true", help="append the rows to docs/benchmarks.md")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--pretend-cpu", help=argparse.SUPPRESS)
    p.add_argument("--guard", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.users, args.items, args.k, args.margin, args.repeats, args.pretend_cpu, args.guard)
        return

    from bench.common import append_row, git_commit, machine_line, today
    from pipeline.io.hardware import read_cpuinfo

    flags = read_cpuinfo().flags
    rows = []
    for name in args.targets:
        if name == "x86-64-v4" and "avx512f" not in flags:
            print(f"{name}: skipped (this CPU has no AVX-512; the kernels would not run)")
            continue
        with tempfile.TemporaryDirectory() as cache:
            cold = run_child(TARGETS[name], Path(cache), args)
            warm = run_child(TARGETS[name], Path(cache), args)
            moved = run_child(TARGETS[name], Path(cache), args, pretend_cpu=PRETEND_CPU)
        rows.append((name, cold, warm, moved))
    with tempfile.TemporaryDirectory() as cache:
        same, other = image_cache(Path(cache), args)
    line = machine_line()
    print(f"top-k kernels, one batch of {args.users:,} x {args.items:,}: fp32 top-{args.k}, bf16 top-{args.k + args.margin}"
          f"; {line}")
    print(f"{'target':10s} {'compile s':>9s} {'load s':>7s} {'other CPU':>22s} {'fp32 ms':>8s} {'bf16 ms':>8s}")
    header = ["date", "commit", "machine", "target (NUMBA_CPU_NAME)", "batch", "compile (s)", "cache load (s)",
              "on another CPU", "fp32 top-k (ms)", "bf16 candidates (ms)"]
    for name, cold, warm, moved in rows:
        elsewhere = (f"loads ({moved['warm_s']:.2f} s)" if moved["cache_misses"] == 0
                     else f"compiles ({moved['warm_s']:.1f} s)")
        print(f"{name:10s} {cold['warm_s']:9.1f} {warm['warm_s']:7.2f} {elsewhere:>22s} {warm['fp32_ms']:8.1f} "
              f"{warm['bf16_ms']:8.1f}")
        if args.append:
            append_row(SECTION, header, [today(), git_commit(), line, name, f"{args.users:,} x {args.items:,}, k {args.k}",
                                         f"{cold['warm_s']:.1f}", f"{warm['warm_s']:.2f}", elsewhere,
                                         f"{warm['fp32_ms']:.1f}", f"{warm['bf16_ms']:.1f}"])
    for where, r in (("this CPU", same), ("another CPU", other)):
        loads = "loads" if r["cache_misses"] == 0 else "compiles"
        print(f"image cache (built in {same['build_s']:.1f} s) on {where}: {loads} the {r['cpu_name'] or 'host'} "
              f"kernels in {r['warm_s']:.2f} s; fp32 {r['fp32_ms']:.1f} ms, bf16 {r['bf16_ms']:.1f} ms")
    if args.append:
        append_row(SECTION, header, [today(), git_commit(), line, "image cache (host + x86-64-v3, guard chooses)",
                                     f"{args.users:,} x {args.items:,}, k {args.k}", f"{same['build_s']:.1f} (both)",
                                     f"{same['warm_s']:.2f} (host kernels)",
                                     f"{'loads' if other['cache_misses'] == 0 else 'compiles'} {other['cpu_name']} "
                                     f"({other['warm_s']:.2f} s; fp32 {other['fp32_ms']:.1f} / bf16 "
                                     f"{other['bf16_ms']:.1f} ms)", f"{same['fp32_ms']:.1f}", f"{same['bf16_ms']:.1f}"])


if __name__ == "__main__":
    main()
