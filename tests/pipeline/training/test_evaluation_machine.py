"""pipeline.training.evaluation.machine_name: what an experiment's or a training run's figures were measured on."""

from __future__ import annotations

import pytest

from pipeline.io import hardware
from pipeline.io.hardware import parse_cpuinfo
from pipeline.training import evaluation

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile
processor\t: 1
"""


def test_a_cpu_is_named_by_its_model_string_family_cpus_and_bf16_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "read_cpuinfo", lambda: parse_cpuinfo(CPUINFO))
    monkeypatch.setattr(evaluation.torch, "get_num_threads", lambda: 3)
    assert evaluation.machine_name("cpu") == ("Intel(R) Xeon(R) Platinum 8480+ (family 6 model 143), 2 CPUs, flags: "
                                              "amx_bf16 amx_tile avx512_bf16 avx512f avx2; 3 torch threads")


def test_without_proc_cpuinfo_the_platform_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "read_cpuinfo", lambda: parse_cpuinfo(""))
    monkeypatch.setattr(hardware.platform, "processor", lambda: "arm")
    name = evaluation.machine_name("cpu")
    assert name.startswith("arm, ")  # the platform name stands for the model string
    assert "flags: none" in name and "torch threads" in name
