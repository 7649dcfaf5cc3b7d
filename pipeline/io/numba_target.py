"""Which CPU the numba top-k kernels load for, so an image's compiled cache is used on whatever CPU the job lands on.

numba keys its on-disk cache by the CPU it compiled for (LLVM's host name and feature string). An image whose cache
was built on one CPU model and run on another compiles both kernels again at every job start (13-14 s on a 2-CPU
Xeon; bench.topk_target). Pinning a portable target (NUMBA_CPU_NAME=x86-64-v3, features from the name) makes the
cache load anywhere with AVX2, but its kernels are slower than the host's (fp32 top-k +15-35% on that Xeon). So the
scoring images build both (`python -m pipeline.io.numba_target`): the host's kernels, the portable ones, and a
record of the build CPU. At start the entry points (`recsys`, pipeline.orchestration.remote) call `guard()` before
numba loads: on the build's CPU nothing changes (the host's kernels load); on another CPU with AVX2 it pins the
portable target (its kernels load, nothing compiles); on a CPU without AVX2 numba compiles for the host. An
operator's own NUMBA_CPU_NAME is kept, unless it is an x86-64-vN level the CPU cannot run (the kernels would die of
an illegal instruction): then it is dropped, with a warning.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
from collections.abc import Mapping, MutableMapping
from pathlib import Path

from pipeline.io.hardware import CpuInfo, read_cpuinfo

log = logging.getLogger(__name__)

NAME, FEATURES = "NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES"
PORTABLE = {NAME: "x86-64-v3", FEATURES: ""}  # features "" = the name's own, not the host's
RECORD = "numba-build-cpu.json"  # beside the kernels' cache: the CPU the host kernels were compiled for
# the /proc/cpuinfo flags each x86-64 micro-architecture level needs beyond the one below it (v2's are older)
LEVEL_FLAGS = {
    "x86-64-v3": ("avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"),
    "x86-64-v4": ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"),
}


def missing_flags(target: str, cpu: CpuInfo) -> list[str]:
    """The flags `target` (an x86-64-vN level) needs that `cpu` lacks; [] for other names (left to the operator)."""
    levels = list(LEVEL_FLAGS)
    if target not in levels:
        return []
    needed = [f for level in levels[: levels.index(target) + 1] for f in LEVEL_FLAGS[level]]
    return [f for f in needed if not cpu.has(f)]


def host_cpu() -> dict[str, str]:
    """What numba keys the host's kernels by: LLVM's name and feature string of this CPU (llvmlite, not numba, so
    nothing of numba's configuration is read yet)."""
    import llvmlite.binding as ll

    return {"name": ll.get_host_cpu_name(), "features": ll.get_host_cpu_features().flatten()}


def cache_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """Where numba caches the top-k kernels: NUMBA_CACHE_DIR's mirror of the source folder, else model/__pycache__
    (found without importing model.topk, which would load numba)."""
    spec = importlib.util.find_spec("model.topk")
    assert spec is not None and spec.origin is not None, "model.topk is not installed"
    source = Path(spec.origin).resolve().parent
    if environ.get("NUMBA_CACHE_DIR"):
        return Path(environ["NUMBA_CACHE_DIR"]) / source.relative_to(source.anchor)
    return source / "__pycache__"


def choose(cpu: CpuInfo, environ: MutableMapping[str, str], built_for: Mapping[str, str] | None,
           current: Mapping[str, str]) -> str | None:
    """Set or drop the pin in `environ` (see the module's doc); returns what it did, or None when nothing."""
    pinned = environ.get(NAME)
    if pinned:
        if not (missing := missing_flags(pinned, cpu)):
            return None
        environ.pop(NAME, None)
        environ.pop(FEATURES, None)
        message = (f"{NAME}={pinned} needs CPU flags this machine lacks ({', '.join(missing)}): compiling the top-k "
                   f"for this CPU instead (about 14 s). Fix: run on a CPU with {pinned}'s instructions, or unset {NAME}")
        log.warning(message)
        return message
    if built_for is None or dict(built_for) == dict(current):
        return None  # no image cache, or this is its CPU: the host's kernels
    if missing := missing_flags(PORTABLE[NAME], cpu):
        message = (f"the top-k kernels were compiled on {built_for.get('name')}; this CPU ({current.get('name')}) lacks "
                   f"{', '.join(missing)} for the portable ones: compiling for it (about 14 s)")
        log.info(message)
        return message
    environ.update(PORTABLE)
    message = (f"the top-k kernels were compiled on {built_for.get('name')}, this is {current.get('name')}: loading "
               f"the image's portable {PORTABLE[NAME]} kernels instead of compiling")
    log.info(message)
    return message


def guard(environ: MutableMapping[str, str] = os.environ) -> str | None:
    """choose() for this machine, from the record the image's build left (none: numba's default). Call it before
    anything imports numba."""
    try:
        built_for = json.loads((cache_dir(environ) / RECORD).read_text())
    except (OSError, ValueError):
        built_for = None
    return choose(read_cpuinfo(), environ, built_for, host_cpu() if built_for is not None else {})


def build(environ: Mapping[str, str] = os.environ) -> Path:
    """Compile the kernels for this CPU and for the portable target into the cache, and record this CPU beside
    them (what the scoring images run at build time); returns the record's path."""
    base = {k: v for k, v in environ.items() if k not in (NAME, FEATURES)}
    for env in (base, base | PORTABLE):  # numba reads the target when imported: one process each
        subprocess.run([sys.executable, "-P", "-m", "model.topk"], env=env, check=True)
    record = cache_dir(environ) / RECORD
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(host_cpu()))
    return record


if __name__ == "__main__":
    print(f"compiled the top-k for this CPU and {PORTABLE[NAME]}; recorded in {build()}")
