"""pipeline.io.numba_target: on the image's build CPU the host's kernels load; on another CPU with AVX2 the portable
ones; without AVX2 numba compiles; an operator's pinned x86-64-vN level the CPU cannot run is dropped with a
warning naming the missing flags and the fix. The entry points choose before the job runs. (The compiles and loads
themselves are real in tests/bench/test_topk_target.py.)"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import pytest

import pipeline.cli.main as cli_main
import pipeline.orchestration.remote as remote
from pipeline.io import numba_target
from pipeline.io.hardware import parse_cpuinfo

V3_FLAGS = "sse2 avx avx2 bmi1 bmi2 f16c fma abm movbe xsave"
HASWELL = parse_cpuinfo(f"processor: 0\nmodel name: Intel(R) Xeon(R) CPU E5-2680 v3\nflags: {V3_FLAGS}\n")
SAPPHIRE = parse_cpuinfo(f"processor: 0\nmodel name: Intel(R) Xeon(R) Platinum 8480+\n"
                         f"flags: {V3_FLAGS} avx512f avx512bw avx512cd avx512dq avx512vl amx_bf16\n")
OLD = parse_cpuinfo("processor: 0\nmodel name: Intel(R) Xeon(R) CPU E5-2670\nflags: sse2 sse4_2 avx\n")
BUILT = {"name": "znver4", "features": "+avx2,+avx512f"}
OTHER = {"name": "sapphirerapids", "features": "+avx2,+amx-bf16"}


def test_missing_flags_by_level() -> None:
    assert numba_target.missing_flags("x86-64-v3", HASWELL) == []
    assert numba_target.missing_flags("x86-64-v4", SAPPHIRE) == []
    assert numba_target.missing_flags("x86-64-v4", HASWELL) == ["avx512f", "avx512bw", "avx512cd", "avx512dq",
                                                                "avx512vl"]
    assert numba_target.missing_flags("x86-64-v3", OLD) == ["avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe",
                                                            "xsave"]
    assert numba_target.missing_flags("skylake", OLD) == []  # a CPU name of the operator's own: not second-guessed


def test_the_build_cpu_keeps_its_own_kernels() -> None:
    env: dict[str, str] = {}
    assert numba_target.choose(SAPPHIRE, env, BUILT, dict(BUILT)) is None and env == {}


def test_another_cpu_loads_the_portable_kernels() -> None:
    env = {"OTHER": "kept"}
    message = numba_target.choose(SAPPHIRE, env, BUILT, OTHER)
    assert env == {"OTHER": "kept", "NUMBA_CPU_NAME": "x86-64-v3", "NUMBA_CPU_FEATURES": ""}
    assert message and "compiled on znver4, this is sapphirerapids" in message


def test_a_cpu_without_avx2_compiles_and_no_record_changes_nothing() -> None:
    env: dict[str, str] = {}
    message = numba_target.choose(OLD, env, BUILT, OTHER)
    assert env == {} and message and "lacks avx2" in message
    assert numba_target.choose(SAPPHIRE, env, None, OTHER) is None and env == {}  # no image cache: numba's default


def test_an_operator_pin_is_kept_unless_the_cpu_cannot_run_it(caplog: pytest.LogCaptureFixture) -> None:
    env = {"NUMBA_CPU_NAME": "x86-64-v4", "NUMBA_CPU_FEATURES": ""}
    assert numba_target.choose(SAPPHIRE, env, BUILT, OTHER) is None and env["NUMBA_CPU_NAME"] == "x86-64-v4"
    with caplog.at_level(logging.WARNING):
        message = numba_target.choose(HASWELL, env, BUILT, OTHER)
    assert env == {}  # numba now compiles for this CPU
    assert message and "avx512f" in message and "Fix: " in message and "unset NUMBA_CPU_NAME" in message
    assert message in caplog.text


def test_the_record_is_read_from_numba_s_cache_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"NUMBA_CACHE_DIR": str(tmp_path)}
    where = numba_target.cache_dir(env)
    assert where.is_relative_to(tmp_path) and where.parts[-1] == "model"
    assert numba_target.cache_dir({}).name == "__pycache__"
    monkeypatch.setattr(numba_target, "read_cpuinfo", lambda: SAPPHIRE)
    monkeypatch.setattr(numba_target, "host_cpu", lambda: OTHER)
    assert numba_target.guard(env) is None  # nothing recorded
    where.mkdir(parents=True)
    (where / numba_target.RECORD).write_text(json.dumps(BUILT))
    assert numba_target.guard(env) and env["NUMBA_CPU_NAME"] == "x86-64-v3"
    (where / numba_target.RECORD).write_text("{not json")
    assert numba_target.guard({"NUMBA_CACHE_DIR": str(tmp_path)}) is None  # unreadable: numba's default


@pytest.mark.parametrize("entry", ["cli", "remote"])
def test_the_entry_points_choose_before_the_job_runs(entry: str, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("NUMBA_CPU_NAME", raising=False)
    record = numba_target.cache_dir() / numba_target.RECORD
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps(BUILT))
    monkeypatch.setattr(numba_target, "read_cpuinfo", lambda: SAPPHIRE)
    monkeypatch.setattr(numba_target, "host_cpu", lambda: OTHER)  # a job on another CPU than the build's
    seen: list[str | None] = []
    if entry == "cli":
        monkeypatch.setattr(cli_main, "build_parser", lambda: _parser(seen))
        assert cli_main.main(["probe"]) == 0
    else:
        def execute(uri: str) -> None:
            seen.append(os.environ.get("NUMBA_CPU_NAME"))
            raise RuntimeError("stop here")
        monkeypatch.setattr(remote, "execute", execute)
        assert remote.main(["s3://bucket/envelope.json"]) == 1
    assert seen == ["x86-64-v3"]  # the job ran with the portable kernels chosen


def _parser(seen: list[str | None]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command")
    probe = sub.add_parser("probe")
    probe.set_defaults(func=lambda args: seen.append(os.environ.get("NUMBA_CPU_NAME")) or 0)
    return p
