"""Paths and tool lookup shared by the infrastructure tests (imported by name: tests/ is not a package)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
DOCKER = REPO / "docker"
TEMPLATES = sorted(INFRA.glob("*.yaml"))


def tool(name: str) -> str | None:
    """A console script of this venv (CI runs `.venv/bin/pytest` without activating the venv), else one on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)
