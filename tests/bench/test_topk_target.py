"""bench.topk_target and the images' cache (pipeline.io.numba_target.build): built on one CPU, a job on the same
CPU loads the host's kernels and a job on another CPU loads the portable ones, so neither compiles; without the
guard the other CPU compiles. The other CPU is simulated by telling numba (and the guard) another host name and
feature set (no second machine here); the compiles and loads are real."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from bench import topk_target
from pipeline.io.hardware import read_cpuinfo
from pipeline.io.numba_target import PORTABLE, RECORD, cache_dir, missing_flags

ARGS = argparse.Namespace(users=30, items=500, k=10, margin=5, repeats=1)


def test_the_image_cache_loads_on_its_cpu_and_on_another(tmp_path: Path) -> None:
    if lacks := missing_flags(PORTABLE["NUMBA_CPU_NAME"], read_cpuinfo()):
        pytest.skip(f"this CPU lacks {', '.join(lacks)}: the portable kernels would not run here")
    same, other = topk_target.image_cache(tmp_path, ARGS)
    assert (cache_dir({"NUMBA_CACHE_DIR": str(tmp_path)}) / RECORD).exists()
    assert same["cache_misses"] == 0 and same["cache_hits"] > 0 and same["cpu_name"] is None  # the host's kernels
    assert same["guard"] is None and same["fp32_ms"] > 0 and same["bf16_ms"] > 0
    assert other["cache_misses"] == 0 and other["cpu_name"] == "x86-64-v3"  # the portable ones: nothing compiles
    assert "loading the image's portable x86-64-v3 kernels" in other["guard"]
    unguarded = topk_target.run_child(None, tmp_path, ARGS, pretend_cpu=topk_target.PRETEND_CPU)
    assert unguarded["cache_misses"] > 0  # the simulated CPU is another CPU to numba: without the guard it compiles
