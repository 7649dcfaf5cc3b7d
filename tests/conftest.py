"""Shared fixtures: where the real data sets live (../shared/data by default, RECSYS_DATA_DIR to move it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    return Path(os.environ.get("RECSYS_DATA_DIR", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = data_dir()
    if not (d / "ml-latest-small" / "interactions.parquet").exists():
        pytest.skip(f"real data sets not found under {d} (set RECSYS_DATA_DIR)")
    return d
