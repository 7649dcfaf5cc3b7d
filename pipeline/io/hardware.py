"""What CPU this process runs on, and whether it multiplies bf16 natively (read from the system, not assumed).

    read_cpuinfo()  /proc/cpuinfo → CpuInfo (model string, family/model, logical CPUs, the flags that matter)
    matmul_rates()  a short fp32 and bf16 product of the decoder's shape → GFLOP/s of each, measured now
    bf16_capability(cpu, measure)  flags AND calibration → Bf16Capability(native, reason)
    detect()        the above for this machine, once per process

bf16 counts as native only when the CPU reports a bf16 matrix/vector instruction set (amx_bf16 or avx512_bf16)
AND the calibration product runs at least MIN_BF16_SPEEDUP times the fp32 rate: a flag says the instructions
exist, not that this torch build uses them (a build without oneDNN's bf16 kernels emulates bf16 and is ~100×
slower than fp32: 0.46 against 80 GFLOP/s on a Zen 3 EPYC without the flags). 1.5× is the threshold because
bf16 scoring adds a candidate top-k and an fp32 re-score that a smaller gain would not pay for; native machines
measured ~5× (issue 30). Without the flags the bf16 product is not timed at all (it would take seconds).
Hypervisors often hide the model string ("AMD EPYC"): family/model and the flags are recorded next to it.
"""

from __future__ import annotations

import functools
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

CPUINFO = Path("/proc/cpuinfo")
BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # either one: the CPU multiplies bf16 in hardware
REPORTED_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2")
MIN_BF16_SPEEDUP = 1.5
CALIBRATION_SHAPE = (512, 600, 4096)  # [B, hidden] x [hidden, items]: the decoder's output layer, smaller


@dataclass(frozen=True)
class CpuInfo:
    model_name: str  # as the system reports it (a hypervisor may shorten it)
    vendor: str
    family: str
    model: str
    logical_cpus: int  # processor entries in /proc/cpuinfo (os.cpu_count() when unreadable)
    flags: frozenset[str]

    def has(self, flag: str) -> bool:
        return flag in self.flags

    @property
    def bf16_flags(self) -> tuple[str, ...]:
        """The bf16 instruction sets the CPU reports (empty: none)."""
        return tuple(f for f in BF16_FLAGS if f in self.flags)

    def describe(self) -> str:
        """One line for a benchmark row: model string, family/model, CPUs and the flags that matter."""
        flags = " ".join(f for f in REPORTED_FLAGS if f in self.flags) or "none"
        fam = f" (family {self.family} model {self.model})" if self.family else ""
        return f"{self.model_name}{fam}, {self.logical_cpus} CPUs, flags: {flags}"


@dataclass(frozen=True)
class MatmulRates:
    fp32_gflops: float
    bf16_gflops: float | None  # None: not measured (no bf16 flag: emulated bf16 takes seconds)
    shape: tuple[int, int, int]

    @property
    def bf16_speedup(self) -> float | None:
        return None if self.bf16_gflops is None or self.fp32_gflops <= 0 else self.bf16_gflops / self.fp32_gflops


@dataclass(frozen=True)
class Bf16Capability:
    native: bool  # bf16 scoring pays off here: flags and calibration agree
    reason: str  # one line: why (recorded in the inference manifest)
    cpu: CpuInfo
    rates: MatmulRates | None


def parse_cpuinfo(text: str) -> CpuInfo:
    """The first processor's fields of /proc/cpuinfo text; the number of processor entries."""
    fields: dict[str, str] = {}
    processors = 0
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip()
        if key == "processor":
            processors += 1
        fields.setdefault(key, value.strip())
    flags = fields.get("flags") or fields.get("Features") or ""  # x86 | arm64
    return CpuInfo(model_name=fields.get("model name") or fields.get("Model name") or "unknown CPU",
                   vendor=fields.get("vendor_id", ""), family=fields.get("cpu family", ""), model=fields.get("model", ""),
                   logical_cpus=processors or os.cpu_count() or 1, flags=frozenset(flags.split()))


def read_cpuinfo(path: Path = CPUINFO) -> CpuInfo:
    """This machine's CpuInfo; an 'unknown CPU' without flags where /proc/cpuinfo is unreadable (not Linux)."""
    try:
        return parse_cpuinfo(path.read_text())
    except OSError:
        return parse_cpuinfo("")


def describe_cpu() -> str:
    """This machine's CpuInfo.describe(), with the platform's name for the model where /proc/cpuinfo gives none."""
    cpu = read_cpuinfo()
    if cpu.model_name == "unknown CPU":
        cpu = replace(cpu, model_name=platform.processor() or platform.machine() or cpu.model_name)
    return cpu.describe()


def _rate(dtype: torch.dtype, shape: tuple[int, int, int], reps: int, budget_s: float) -> float:
    import torch

    b, h, n = shape
    a = torch.randn(b, h).to(dtype)
    w = torch.randn(h, n).to(dtype)
    out = torch.empty(b, n, dtype=dtype)
    torch.mm(a, w, out=out)  # warm-up: kernel selection, first-touch of `out`
    done, t0 = 0, time.perf_counter()
    while done < reps and (done == 0 or time.perf_counter() - t0 < budget_s):
        torch.mm(a, w, out=out)
        done += 1
    return 2.0 * b * h * n * done / (time.perf_counter() - t0) / 1e9


def matmul_rates(bf16: bool = True, shape: tuple[int, int, int] = CALIBRATION_SHAPE, reps: int = 5,
                 budget_s: float = 1.0) -> MatmulRates:
    """GFLOP/s of an fp32 and (if `bf16`) a bf16 torch.mm of `shape` on the CPU, measured now (best of a few)."""
    import torch

    fp32 = _rate(torch.float32, shape, reps, budget_s)
    return MatmulRates(fp32, _rate(torch.bfloat16, shape, reps, budget_s) if bf16 else None, shape)


def bf16_capability(cpu: CpuInfo, measure: Callable[[bool], MatmulRates] = matmul_rates) -> Bf16Capability:
    """Whether bf16 scoring pays off on `cpu`: a bf16 flag, then a calibration product at least MIN_BF16_SPEEDUP
    faster than fp32. `measure(bf16)` times the products (tests pass fake rates)."""
    if not cpu.bf16_flags:
        return Bf16Capability(False, f"CPU reports no bf16 instructions ({' or '.join(BF16_FLAGS)} absent)", cpu,
                              measure(False))
    rates = measure(True)
    speedup = rates.bf16_speedup or 0.0
    flags = "+".join(cpu.bf16_flags)
    measured = (f"bf16 matmul {rates.bf16_gflops or 0:.0f} vs fp32 {rates.fp32_gflops:.0f} GFLOP/s "
                f"({speedup:.1f}x)")
    if speedup < MIN_BF16_SPEEDUP:
        return Bf16Capability(False, f"CPU reports {flags} but {measured} < {MIN_BF16_SPEEDUP}x: not used", cpu, rates)
    return Bf16Capability(True, f"CPU reports {flags}; {measured}", cpu, rates)


@functools.cache
def detect() -> Bf16Capability:
    """This machine's bf16 capability, calibrated once per process (about 0.1-1 s)."""
    return bf16_capability(read_cpuinfo())


# The dense I x I budget's default: a quarter of this machine's memory (EASE's solve holds one I x I buffer on the
# CPU, two on a GPU; serving holds the float32 I x I weights), capped at 32 GiB so a big host does not silently
# accept a catalog its inference workers cannot load. TrainJob.max_dense_bytes and InferJob.max_model_mb use it.
DENSE_CAP = 32 * 2**30


def default_dense_bytes() -> int:
    """A quarter of this machine's memory, at most DENSE_CAP (4 GiB where the memory cannot be read)."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30
    return int(min(DENSE_CAP, total // 4))
