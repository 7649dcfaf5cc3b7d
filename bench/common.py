"""Shared helpers of the benchmarks: the machine's name and appending a row to docs/benchmarks.md."""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
from pathlib import Path

import psutil
import torch

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = psutil.virtual_memory().total / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, torch {torch.__version__} ({torch.get_num_threads()} threads)"


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
