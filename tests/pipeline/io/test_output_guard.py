"""pipeline.io.output_guard: a writer replaces only what it wrote itself (its marker), refuses everything else
before writing anything, and never loses the previous content when it fails."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline.errors import DataError
from pipeline.io import output_guard
from pipeline.io.lake import resolve
from pipeline.io.output_guard import EVENTS_MARKER, replace_output

WRITER = "recsys synth"


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root (hidden ones included) with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def write(uri: str, payload: bytes = b"new", writer: str = WRITER, sources: tuple[Path, ...] = ()) -> None:
    with replace_output(uri, writer, sources=sources) as staged:
        staged.location.join("dt=2024-01-01", "part-0.parquet").write_bytes(payload)


def no_leftovers(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_new_empty_and_own_targets_are_written_and_replaced(tmp_path: Path) -> None:
    out = tmp_path / "ev"
    write(str(out), b"one")
    assert tree(out)["dt=2024-01-01/part-0.parquet"] == b"one"
    marker = json.loads((out / EVENTS_MARKER).read_text())
    assert marker["writer"] == WRITER and marker["complete"] is True
    write(str(out), b"two")  # a re-run over its own output replaces it
    assert tree(out)["dt=2024-01-01/part-0.parquet"] == b"two" and no_leftovers(tmp_path)
    (tmp_path / "empty").mkdir()
    write(str(tmp_path / "empty"))
    assert (tmp_path / "empty" / EVENTS_MARKER).is_file() and no_leftovers(tmp_path)


def _foreign(tmp_path: Path) -> Path:
    out = tmp_path / "data"
    (out / "dt=2024-01-01").mkdir(parents=True)
    (out / "dt=2024-01-01" / "part-0.parquet").write_bytes(b"someone's events")
    (out / "notes.txt").write_text("keep me")
    return out


@pytest.mark.parametrize("case", ["foreign", "other_writer", "bad_marker", "marker_not_object", "file"])
def test_refusals_leave_every_file_as_it_was(tmp_path: Path, case: str) -> None:
    out = _foreign(tmp_path)
    expect = {"foreign": "not written by recsys synth", "other_writer": "holds output of 'recsys ingest'",
              "bad_marker": "marker _RECSYS_EVENTS.json is unreadable", "marker_not_object": "not a JSON object",
              "file": "is a file"}[case]
    if case == "other_writer":
        (out / EVENTS_MARKER).write_text(json.dumps({"writer": "recsys ingest"}))
    elif case == "bad_marker":
        (out / EVENTS_MARKER).write_text("{not json")
    elif case == "marker_not_object":
        (out / EVENTS_MARKER).write_text("[1]")
    elif case == "file":
        out = tmp_path / "events.parquet"
        out.write_bytes(b"a file")
    before = tree(tmp_path)
    with pytest.raises(DataError, match=expect) as e:
        write(str(out))
    assert "\n" not in str(e.value) and str(out) in str(e.value) and "Fix:" in str(e.value)
    assert tree(tmp_path) == before and no_leftovers(tmp_path)


def test_refuses_roots_and_the_home_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home" / "me"
    home.mkdir(parents=True)
    (home / ".bashrc").write_text("keep")
    monkeypatch.setenv("HOME", str(home))
    root_before = sorted(os.listdir("/"))
    with pytest.raises(DataError, match="is a filesystem root"):
        write("/")
    with pytest.raises(DataError, match="is a filesystem root"):
        write("file:///")
    before = tree(tmp_path)
    for target in (home, home.parent, "~"):
        with pytest.raises(DataError, match="home directory"):
            write(str(target))
    assert tree(tmp_path) == before and sorted(os.listdir("/")) == root_before


def test_mount_points_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "vol").mkdir()
    monkeypatch.setattr(os.path, "ismount", lambda p: str(p) == str(tmp_path / "vol"))
    with pytest.raises(DataError, match="mount point"):
        write(str(tmp_path / "vol"))


def test_source_inside_or_around_the_target(tmp_path: Path) -> None:
    out = tmp_path / "work"
    (out / "raw").mkdir(parents=True)
    src = out / "raw" / "ratings.csv"
    src.write_text("userId,movieId,rating,timestamp\n")
    before = tree(tmp_path)
    with pytest.raises(DataError, match="contains the source"):
        write(str(out), sources=(src,))
    with pytest.raises(DataError, match="lies inside the source folder"):
        write(str(out / "raw" / "events"), sources=(out / "raw",))
    with pytest.raises(DataError, match="is the source itself"):
        write(str(out / "raw"), sources=(out / "raw",))
    assert tree(tmp_path) == before and no_leftovers(tmp_path) and no_leftovers(out)


def test_failure_while_writing_keeps_the_previous_output(tmp_path: Path) -> None:
    out = tmp_path / "ev"
    write(str(out), b"good")
    before = tree(tmp_path)
    with pytest.raises(RuntimeError, match="disk full"), replace_output(str(out), WRITER) as staged:
        staged.location.join("part-0.parquet").write_bytes(b"half")
        raise RuntimeError("disk full")
    assert tree(tmp_path) == before and no_leftovers(tmp_path)


def test_failed_swap_puts_the_previous_output_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "ev"
    write(str(out), b"good")
    before = tree(tmp_path)
    real = os.rename
    calls = []

    def rename(a: str, b: str) -> None:
        calls.append((a, b))
        if len(calls) == 2:  # the old output moved aside; moving the new one in fails
            raise OSError(28, "No space left on device")
        real(a, b)

    monkeypatch.setattr(output_guard.os, "rename", rename)
    with pytest.raises(OSError, match="No space"):
        write(str(out), b"new")
    assert tree(tmp_path) == before and no_leftovers(tmp_path)


def test_a_target_written_meanwhile_is_not_replaced(tmp_path: Path) -> None:
    out = tmp_path / "ev"
    with pytest.raises(DataError, match="not written by"), replace_output(str(out), WRITER) as staged:
        staged.location.join("part-0.parquet").write_bytes(b"new")
        out.mkdir()
        (out / "theirs.txt").write_text("arrived while we wrote")
    assert tree(out) == {"theirs.txt": b"arrived while we wrote"} and no_leftovers(tmp_path)


def test_unwritable_place(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(DataError, match="cannot write next to --out"):
        write(str(tmp_path / "a-file" / "ev"))
    assert (tmp_path / "a-file").read_text() == "x"


# -- S3 (moto) ----------------------------------------------------------------------------------------------------


def objects(bucket_uri: str) -> dict[str, bytes]:
    import boto3

    name = bucket_uri.removeprefix("s3://")
    s3 = boto3.client("s3")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=name).get("Contents", [])]
    return {k: s3.get_object(Bucket=name, Key=k)["Body"].read() for k in keys}


def test_s3_bucket_root_and_foreign_prefix_are_refused(s3_bucket: str) -> None:
    resolve(f"{s3_bucket}/data/dt=2024-01-01/part-0.parquet").write_bytes(b"someone's events")
    resolve(f"{s3_bucket}/events.parquet").write_bytes(b"a file")
    before = objects(s3_bucket)
    for uri, expect in ((s3_bucket, "bucket root"), (f"{s3_bucket}/", "bucket root"),
                        (f"{s3_bucket}/data", "not written by"), (f"{s3_bucket}/events.parquet", "is a file")):
        with pytest.raises(DataError, match=expect) as e:
            write(uri)
        assert "\n" not in str(e.value)
    assert objects(s3_bucket) == before


def test_s3_own_output_is_replaced_and_a_failure_keeps_it(s3_bucket: str) -> None:
    uri = f"{s3_bucket}/events"
    write(uri, b"one")
    with replace_output(uri, WRITER) as staged:
        staged.location.join("dt=2024-01-02", "part-0.parquet").write_bytes(b"two")
    got = objects(s3_bucket)
    assert set(k for k in got if not k.endswith("/")) == {f"events/{EVENTS_MARKER}", "events/dt=2024-01-02/part-0.parquet"}
    before = objects(s3_bucket)
    with pytest.raises(RuntimeError, match="bad input"), replace_output(uri, WRITER) as staged:
        staged.location.join("dt=2024-01-03", "part-0.parquet").write_bytes(b"three")
        raise RuntimeError("bad input")
    assert objects(s3_bucket) == before  # nothing of the staging prefix is left either


def test_s3_swap_failing_part_way_keeps_the_marker_so_a_rerun_replaces(s3_bucket: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """S3 has no rename: if copying the new objects in fails, the folder still carries the writer's marker (a
    re-run replaces it instead of refusing it) and the message points at the complete staged output."""
    uri = f"{s3_bucket}/events"
    write(uri, b"one")

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError("connection reset")

    with monkeypatch.context() as m:
        m.setattr(output_guard.pafs, "copy_files", fail)
        with pytest.raises(DataError, match=r"replacing .*events failed part way \(connection reset\); the new output "
                                            r"is complete at s3://.*/\.events\.tmp-") as e:
            write(uri, b"two")
    assert "re-run the same command" in str(e.value)
    assert json.loads(resolve(uri).join(EVENTS_MARKER).read_bytes())["writer"] == WRITER
    write(uri, b"three")
    assert resolve(uri).join("dt=2024-01-01", "part-0.parquet").read_bytes() == b"three"
