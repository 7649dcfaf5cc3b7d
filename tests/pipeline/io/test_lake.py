"""pipeline.io.lake: local writes land whole (a reader never sees a torn file), and file:// URIs are read exactly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.errors import DataError
from pipeline.io import lake


def test_local_write_replaces_the_file_whole(tmp_path: Path) -> None:
    loc = lake.resolve(tmp_path / "snap" / "manifest.json")
    loc.write_bytes(b"old content")
    with open(loc.path, "rb") as reader:  # a reader that opened the file before the rewrite...
        loc.write_bytes(b"new")
        assert reader.read() == b"old content"  # ...still reads the whole old file (in place it would see b"")
    assert loc.read_bytes() == b"new"
    assert os.listdir(tmp_path / "snap") == ["manifest.json"]  # no temporary file left


def test_a_failed_local_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    loc = lake.resolve(tmp_path / "manifest.json")
    loc.write_bytes(b"old content")

    def fail(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="No space"):
        loc.write_bytes(b"new")
    assert loc.read_bytes() == b"old content" and os.listdir(tmp_path) == ["manifest.json"]


def test_file_uris(tmp_path: Path) -> None:
    spaced = tmp_path / "my lake"
    assert lake.resolve(f"file://{tmp_path}/my%20lake").path == str(spaced)
    assert lake.resolve(f"file://localhost{tmp_path}/x").path == str(tmp_path / "x")
    assert lake.resolve(str(tmp_path / "a%20b")).path == str(tmp_path / "a%20b")  # plain paths are taken as given
    for bad in ("file://lake/out", "file://otherhost/tmp/x", "file://localhost:8080/tmp/x"):
        with pytest.raises(DataError, match=r"names host .*Fix: use file:///absolute/path"):
            lake.resolve(bad)
    with pytest.raises(DataError, match="invalid location"):
        lake.resolve("file:///tmp/a%00b")
