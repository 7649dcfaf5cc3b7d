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


def test_the_table_and_the_rows(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    """main's printing and appending, with the processes replaced by their results (the compiles are real above)."""
    import bench.common

    def result(misses: int, cpu: str | None = None, **kw: float) -> dict[str, object]:
        return {"warm_s": 13.5 if misses else 0.3, "cache_misses": misses, "cache_hits": 0 if misses else 2,
                "fp32_ms": 50.0, "bf16_ms": 51.0, "cpu_name": cpu, "guard": None} | kw

    def run_child(target: object, cache_dir: Path, args: object, pretend_cpu: str | None = None,
                  guard: bool = False) -> dict[str, object]:
        return result(1 if target is None and pretend_cpu else 0)  # the host's kernels on another CPU compile

    monkeypatch.setattr(topk_target, "run_child", run_child)
    monkeypatch.setattr(topk_target, "image_cache", lambda cache, args: (result(0, build_s=31.0),
                                                                         result(0, "x86-64-v3", fp32_ms=60.0)))
    monkeypatch.setattr(bench.common, "DOC", tmp_path / "benchmarks.md")
    topk_target.main(["--targets", "host", "--append", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "host" in out and "compiles (13.5 s)" in out
    assert "on another CPU: loads the x86-64-v3 kernels in 0.30 s; fp32 60.0 ms" in out
    rows = [line for line in (tmp_path / "benchmarks.md").read_text().splitlines() if line.startswith("| 20")]
    assert len(rows) == 2 and "| host |" in rows[0] and "image cache (host + x86-64-v3" in rows[1]
    assert "loads x86-64-v3 (0.30 s; fp32 60.0 / bf16 51.0 ms)" in rows[1]
