"""The wheel holds the whole source tree and every module imports from it alone (no repo on the path).

pyproject finds the packages (`[tool.setuptools.packages.find]`): a listed set silently dropped new subpackages
from the wheel, and the images install the wheel, so a module missing from it fails only in production. The
build runs on a copy of the sources (never writes build/ or *.egg-info into the checkout, and cannot pick up a
stale build/lib); the imports run in a fresh interpreter, outside the repo, with the editable install switched off.
"""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("model", "pipeline")

pytestmark = pytest.mark.slow

IMPORT_ALL = r"""
import importlib, json, sys, traceback
wheel_dir, names, entry = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
# the venv's editable install maps `pipeline` to the checkout: only the unpacked wheel may answer
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
failed, outside = {}, {}
for name in names:
    try:
        module = importlib.import_module(name)
    except BaseException as e:
        failed[name] = "".join(traceback.format_exception_only(e)).strip()
        continue
    if not str(getattr(module, "__file__", "")).startswith(wheel_dir):
        outside[name] = str(getattr(module, "__file__", None))
target, _, attr = entry.partition(":")
entry_ok = callable(getattr(importlib.import_module(target), attr, None)) if target not in failed else False
print(json.dumps({"failed": failed, "outside": outside, "entry_ok": entry_ok}))
"""


def _source_files() -> set[str]:
    return {p.relative_to(ROOT).as_posix() for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
            if "__pycache__" not in p.parts}


def _module(path: str) -> str:
    parts = path.removesuffix(".py").split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir",
                        "--disable-pip-version-check", "-q", "-w", str(tmp / "dist"), str(src)],
                       capture_output=True, text=True, timeout=180, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    (whl,) = (tmp / "dist").glob("recsys_pia-*.whl")
    return whl


def test_the_wheel_holds_every_source_module_and_nothing_stale(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        in_wheel = {n for n in z.namelist() if n.endswith(".py") and n.split("/")[0] in PACKAGES}
    source = _source_files()
    missing, extra = sorted(source - in_wheel), sorted(in_wheel - source)
    assert not missing, f"source modules missing from the wheel: {missing}"
    assert not extra, f"modules in the wheel that the source tree does not have: {extra}"


def test_every_module_imports_from_the_unpacked_wheel(wheel: Path, tmp_path: Path) -> None:
    unpacked = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(unpacked)
        (dist_info,) = {n.split("/")[0] for n in z.namelist() if n.split("/")[0].endswith(".dist-info")}
    entry_points = configparser.ConfigParser()
    entry_points.read(unpacked / dist_info / "entry_points.txt")
    entry = entry_points["console_scripts"]["recsys"]
    assert entry == "pipeline.cli.main:main"

    names = sorted(_module(p) for p in _source_files())
    cwd = tmp_path / "elsewhere"  # not the repo: `import pipeline` must not find the checkout through the cwd
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env["PYTHONPATH"] = str(unpacked)
    r = subprocess.run([sys.executable, "-c", IMPORT_ALL, str(unpacked), json.dumps(names), entry], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=240, check=False)
    assert r.returncode == 0, r.stderr[-5000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    if result["failed"]:
        pytest.fail("modules that do not import from the wheel:\n  " + "\n  ".join(
            f"{name}: {error}" for name, error in sorted(result["failed"].items())), pytrace=False)
    assert result["outside"] == {}, f"imported from outside the wheel: {result['outside']}"
    assert result["entry_ok"], f"console script {entry} does not resolve"
