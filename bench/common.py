"""Shared helpers of the benchmarks: the machine's name and matmul rates, and appending a row to docs/benchmarks.md.

Every row names the machine as read from the system (pipeline.io.hardware): the CPU model string (a hypervisor may
shorten it, so family/model too), logical CPUs, the flags that decide bf16 (amx_bf16, amx_tile, avx512_bf16,
avx512f, avx2), and fp32 and bf16 matmul rates measured in the same run (`machine_rates`), so ratios compare
across machines.
"""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path

import psutil
import torch

from pipeline.io.hardware import MatmulRates, describe_cpu, matmul_rates, read_cpuinfo

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def machine(device: torch.device) -> str:
    """The device's name; for the CPU its model string, family/model, CPUs, flags, memory and torch threads."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__}; host {read_cpuinfo().describe()})"
    mem = psutil.virtual_memory().total / 2**30
    return f"{describe_cpu()}, {mem:.0f} GiB, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def machine_rates(reps: int = 3, budget_s: float = 2.0) -> MatmulRates:
    """fp32 and bf16 CPU matmul GFLOP/s at the calibration shape (pipeline.io.hardware.CALIBRATION_SHAPE),
    measured now; bf16 is measured on every CPU (emulated where the flags are absent: seconds, not minutes)."""
    return matmul_rates(bf16=True, reps=reps, budget_s=budget_s)


def rates_text(r: MatmulRates) -> str:
    """`fp32 80.1 / bf16 0.462 GFLOP/s (0.0058x) at [512,600]x[600,4096]` for a row."""
    b, h, n = r.shape
    return (f"fp32 {r.fp32_gflops:.3g} / bf16 {r.bf16_gflops or float('nan'):.3g} GFLOP/s "
            f"({r.bf16_speedup or float('nan'):.2g}x) at [{b},{h}]x[{h},{n}]")


def machine_line(device: torch.device | str = "cpu") -> str:
    """machine() and, on the CPU, the matmul rates measured now (what a row or a printed result names)."""
    d = torch.device(device)
    return machine(d) + ("" if d.type == "cuda" else f"; {rates_text(machine_rates())}")


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=DOC.parent.parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def append_row(section: str, header: list[str], row: list[str]) -> None:
    """Append `row` under `## section` in docs/benchmarks.md, creating the section's table if needed."""
    DOC.parent.mkdir(parents=True, exist_ok=True)
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n\nRows are appended by the `make bench-*` targets.\n"
    title = f"## {section}"
    line = "| " + " | ".join(row) + " |"
    if title not in text:
        text = text.rstrip("\n") + f"\n\n{title}\n\n| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
        text += line + "\n"
    else:
        head, rest = text.split(title, 1)
        # the section's table ends at the next blank line after its header
        parts = rest.split("\n\n", 2)
        parts[1] = parts[1].rstrip("\n") + "\n" + line
        text = head + title + "\n\n".join(parts)
    DOC.write_text(text)


def rss_gib() -> float:
    """This process's resident set size now (GiB)."""
    return psutil.Process().memory_info().rss / 2**30


def today() -> str:
    return dt.date.today().isoformat()
