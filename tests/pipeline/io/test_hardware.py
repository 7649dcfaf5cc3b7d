"""Capability detection with faked /proc/cpuinfo text and faked matmul rates (no real calibration runs here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.io import hardware
from pipeline.io.hardware import MIN_BF16_SPEEDUP, MatmulRates, bf16_capability, parse_cpuinfo

SAPPHIRE_RAPIDS = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8
"""
ZEN4 = ("processor: 0\nvendor_id: AuthenticAMD\ncpu family: 25\nmodel: 17\nmodel name: AMD EPYC 9654\n"
        "flags: avx2 avx512f avx512_bf16\n")
ZEN3_VM = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\nmodel name\t: AMD EPYC\n"
           "flags\t\t: sse2 avx avx2 fma\n")


def rates(fp32: float, bf16: float | None) -> object:
    calls: list[bool] = []

    def measure(with_bf16: bool) -> MatmulRates:
        calls.append(with_bf16)
        return MatmulRates(fp32, bf16 if with_bf16 else None, (512, 600, 4096))

    measure.calls = calls  # type: ignore[attr-defined]
    return measure


def test_parse_reads_model_family_cpus_and_flags() -> None:
    cpu = parse_cpuinfo(SAPPHIRE_RAPIDS)
    assert cpu.model_name == "Intel(R) Xeon(R) Platinum 8480+" and cpu.vendor == "GenuineIntel"
    assert (cpu.family, cpu.model, cpu.logical_cpus) == ("6", "143", 2)
    assert cpu.bf16_flags == ("amx_bf16", "avx512_bf16") and cpu.has("amx_tile")
    assert cpu.describe() == ("Intel(R) Xeon(R) Platinum 8480+ (family 6 model 143), 2 CPUs, "
                              "flags: amx_bf16 amx_tile avx512_bf16 avx512f avx2")
    vm = parse_cpuinfo(ZEN3_VM)
    assert vm.bf16_flags == () and vm.describe().endswith("flags: avx2")
    assert parse_cpuinfo("").model_name == "unknown CPU"  # not Linux: no flags, so never native


def test_native_needs_a_flag_and_a_calibrated_speedup() -> None:
    fast = rates(100.0, 500.0)
    cap = bf16_capability(parse_cpuinfo(SAPPHIRE_RAPIDS), fast)  # type: ignore[arg-type]
    assert cap.native and "amx_bf16+avx512_bf16" in cap.reason and "(5.0x)" in cap.reason
    # the flag is there but this torch build does not use it (bf16 emulated): not native
    slow = bf16_capability(parse_cpuinfo(ZEN4), rates(100.0, 100.0 * MIN_BF16_SPEEDUP * 0.9))  # type: ignore[arg-type]
    assert not slow.native and "avx512_bf16" in slow.reason and "not used" in slow.reason
    edge = bf16_capability(parse_cpuinfo(ZEN4), rates(100.0, 100.0 * MIN_BF16_SPEEDUP))  # type: ignore[arg-type]
    assert edge.native


def test_without_a_flag_bf16_is_never_timed() -> None:
    measure = rates(80.0, 9999.0)  # even a (fake) fast bf16 product does not count without the flag
    cap = bf16_capability(parse_cpuinfo(ZEN3_VM), measure)  # type: ignore[arg-type]
    assert not cap.native and "no bf16 instructions" in cap.reason
    assert measure.calls == [False]  # type: ignore[attr-defined]  # the slow emulated product is skipped
    assert cap.rates is not None and cap.rates.bf16_gflops is None and cap.rates.bf16_speedup is None


def test_read_cpuinfo_of_a_missing_file_is_unknown(tmp_path: Path) -> None:
    cpu = hardware.read_cpuinfo(tmp_path / "nope")
    assert cpu.model_name == "unknown CPU" and not cpu.flags and cpu.logical_cpus >= 1


def test_matmul_rates_measures_this_cpu_briefly() -> None:
    r = hardware.matmul_rates(bf16=False, shape=(64, 32, 128), reps=2, budget_s=0.2)
    assert r.fp32_gflops > 0 and r.bf16_gflops is None and r.shape == (64, 32, 128)
    r = hardware.matmul_rates(bf16=True, shape=(16, 16, 32), reps=1, budget_s=0.1)
    assert r.bf16_gflops is not None and r.bf16_gflops > 0


@pytest.mark.parametrize("text", [SAPPHIRE_RAPIDS, ZEN4, ZEN3_VM])
def test_flag_names_are_whole_words(text: str) -> None:
    cpu = parse_cpuinfo(text.replace("avx512_bf16", "avx512_bf16x"))  # a longer name is not the flag
    assert "avx512_bf16" not in cpu.bf16_flags
