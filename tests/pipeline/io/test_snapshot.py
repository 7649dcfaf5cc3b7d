"""pipeline.io.snapshot: the in-memory writer and the one-call loader round-trip; publish replaces, keeps the replaced
run for readers still on it, and never unpublishes a run once its manifest is written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from model.split import strong_generalization_split
from pipeline.data.synth import synth_interactions
from pipeline.errors import DataError
from pipeline.io import snapshot
from pipeline.io.lake import Location, resolve
from pipeline.io.publish import write_single_object
from pipeline.io.snapshot import MANIFEST, load_snapshot, read_manifest, read_table, write_snapshot


@pytest.fixture(scope="module")
def data():
    f = synth_interactions(300, 80, seed=1)
    x = sp.csr_matrix((np.ones(len(f), np.float32), (f.user_id, f.item_id)), shape=(300, 80))
    split = strong_generalization_split(x, seed=0, n_valid=30, n_test=30)
    user_ids = np.array([f"u{i}" for i in range(x.shape[0])])
    item_ids = np.arange(1000, 1000 + x.shape[1], dtype=np.int64)
    return x, split, user_ids, item_ids


def test_round_trip(tmp_path: Path, data) -> None:
    _, split, user_ids, item_ids = data
    uri = write_snapshot(str(tmp_path / "snap"), user_ids, item_ids, split, {"as_of": "2026-01-01"})
    snap = load_snapshot(uri)
    assert (snap.train != split.train).nnz == 0
    for a, b in ((snap.valid, split.valid), (snap.test, split.test)):
        np.testing.assert_array_equal(a.users, b.users)
        assert (a.fold_in != b.fold_in).nnz == 0 and (a.targets != b.targets).nnz == 0
    np.testing.assert_array_equal(snap.train_users, split.train_users)
    np.testing.assert_array_equal(snap.item_ids, item_ids[split.item_index])
    assert list(snap.user_ids[:3]) == ["u0", "u1", "u2"]
    assert snap.manifest["as_of"] == "2026-01-01" and snap.manifest["counts"]["train_users"] == len(split.train_users)
    np.testing.assert_array_equal(snap.item_popularity(), np.asarray(split.train.sum(0)).ravel())


def _runs(root: Path) -> set[str]:
    return {p.name for p in root.iterdir() if p.name.startswith("run-")}


def _write(root: Path, data) -> str:
    _, split, user_ids, item_ids = data
    write_snapshot(str(root), user_ids, item_ids, split)
    return str(read_manifest(str(root))["run"])


def test_rewrite_keeps_the_replaced_run_for_readers_and_removes_older(tmp_path: Path, data) -> None:
    root = tmp_path / "snap"
    first = _write(root, data)
    (root / "run-crashed0000").mkdir()  # an unpublished leftover of a killed build
    (root / (MANIFEST + ".tmp-dead")).write_text("{")  # a manifest write killed before its rename
    second = _write(root, data)
    assert first != second and sorted(p.name for p in root.iterdir()) == sorted([MANIFEST, first, second])
    third = _write(root, data)
    assert _runs(root) == {second, third}
    assert load_snapshot(str(root)).manifest["run"] == third


def test_a_reader_of_the_previous_manifest_can_finish_after_a_rebuild(tmp_path: Path, data) -> None:
    root = tmp_path / "snap"
    _write(root, data)
    old = read_manifest(str(root))  # a trainer has read the manifest, not yet the files
    _write(root, data)
    assert read_table(resolve(str(root)), old, "train", verify=True).num_rows == old["counts"]["train_interactions"]


def test_overlapping_builds_the_newest_started_wins(tmp_path: Path, data) -> None:
    _, split, user_ids, item_ids = data
    root = resolve(str(tmp_path / "snap"))
    tables = snapshot.snapshot_tables(user_ids, item_ids, split)
    older, newer = snapshot.new_run_id(), snapshot.new_run_id()
    assert snapshot.run_order(older) < snapshot.run_order(newer)
    files_old, files_new = snapshot.write_tables(root, older, tables), snapshot.write_tables(root, newer, tables)
    snapshot.publish(root, older, files_old, {"snapshot_id": "s"})  # the newer build is still writing: left alone
    assert (tmp_path / "snap" / newer).is_dir() and read_manifest(root.uri)["run"] == older
    snapshot.publish(root, newer, files_new, {"snapshot_id": "s"})
    assert _runs(tmp_path / "snap") == {older, newer} and load_snapshot(root.uri).manifest["run"] == newer
    # the other order: an older build finishing after a newer one's publish is refused and removed by write_run
    third = snapshot.new_run_id()
    snapshot.publish(root, third, snapshot.write_tables(root, third, tables), {"snapshot_id": "s"})
    with pytest.raises(DataError, match=f"a newer build \\({third}\\) is published already"):
        snapshot.publish(root, newer, files_new, {"snapshot_id": "s"})
    assert read_manifest(root.uri)["run"] == third and load_snapshot(root.uri).train.nnz > 0


def test_run_ids_from_before_time_sorted_ids_count_as_older() -> None:
    assert snapshot.run_order("run-ffffffffffff") < snapshot.run_order(snapshot.new_run_id())


class Timeout(BaseException):
    """Like Airflow's task timeout: not an Exception."""


@pytest.mark.parametrize("error", [OSError("S3 503"), Timeout()])
def test_cleanup_failure_after_the_manifest_never_unpublishes(tmp_path: Path, data, error: BaseException,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "snap"
    first, second = _write(root, data), _write(root, data)

    def fail(self: Location) -> None:
        raise error

    monkeypatch.setattr(Location, "delete", fail)
    if isinstance(error, Exception):
        third = _write(root, data)
        assert f"could not delete {first}" in caplog.text  # a warning; the build succeeded
    else:
        with pytest.raises(Timeout):
            _write(root, data)
        third = str(read_manifest(str(root))["run"])
    assert third not in (first, second) and _runs(root) == {first, second, third}
    assert load_snapshot(str(root)).manifest["run"] == third  # the manifest names a folder that exists
    monkeypatch.undo()
    fourth = _write(root, data)  # the next build retries the clean-up
    assert _runs(root) == {third, fourth}


@pytest.mark.parametrize("landed", [False, True])
def test_failed_manifest_write(tmp_path: Path, data, landed: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not landed: the new run is removed, the previous snapshot stays published. Landed (an S3 PUT that
    succeeded but timed out on the client): the new run is published and must stay."""
    root = tmp_path / "snap"
    first = _write(root, data)

    def write(loc: Location, body: bytes) -> None:
        if landed:
            write_single_object(loc, body)
        raise OSError("connection reset")

    monkeypatch.setattr(snapshot, "write_single_object", write)
    with pytest.raises(OSError, match="connection reset"):
        _write(root, data)
    published = load_snapshot(str(root)).manifest["run"]
    assert (published != first) == landed and _runs(root) == {first, published}


def test_corrupt_previous_manifest_is_replaced(tmp_path: Path, data) -> None:
    root = tmp_path / "snap"
    first = _write(root, data)
    (root / MANIFEST).write_text("not json")
    second = _write(root, data)
    assert load_snapshot(str(root)).manifest["run"] == second and _runs(root) == {second}  # nobody could read first
    assert first != second


def test_missing_manifest_and_tampered_file_are_clear_errors(tmp_path: Path, data) -> None:
    _, split, user_ids, item_ids = data
    with pytest.raises(DataError, match="no published snapshot"):
        load_snapshot(str(tmp_path / "nothing"))
    root = tmp_path / "snap"
    write_snapshot(str(root), user_ids, item_ids, split)
    part = next(root.glob("run-*/train/*.parquet"))
    part.write_bytes(part.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(DataError, match="does not match its manifest hash"):
        load_snapshot(str(root))


@pytest.mark.parametrize("body, problem", [
    ("{not json", r"is not valid JSON \(Expecting property name"),
    ("", r"is not valid JSON \(Expecting value"),
    ('["run-x"]', r"is malformed: a JSON list, not an object"),
    ('{"run": "run-x"}', r"is malformed: no files"),
    ('{"run": "run-x", "files": {"oops": {}}}', r"is malformed: bad file entry 'oops'"),
])
def test_corrupt_manifest_is_one_error_naming_the_file(tmp_path: Path, data, body: str, problem: str) -> None:
    root = tmp_path / "snap"
    _write(root, data)
    (root / MANIFEST).write_text(body)
    with pytest.raises(DataError, match=rf"{root}/{MANIFEST} {problem}.*Fix: rebuild the snapshot with `recsys build-matrix`"):
        load_snapshot(str(root))


def test_missing_snapshot_file_is_one_error_naming_it(tmp_path: Path, data) -> None:
    root = tmp_path / "snap"
    _write(root, data)
    part = next(root.glob("run-*/heldout/*.parquet"))
    part.unlink()
    with pytest.raises(DataError, match=rf"snapshot file {part} is missing \(its manifest names it\)\. Fix: rebuild"):
        load_snapshot(str(root))


def test_unreadable_parquet_without_verification_names_the_file(tmp_path: Path, data) -> None:
    root = tmp_path / "snap"
    _write(root, data)
    part = next(root.glob("run-*/items/*.parquet"))
    part.write_bytes(b"user_idx,item_idx\n1,2\n")  # CSV where Parquet belongs
    with pytest.raises(DataError, match=rf"snapshot file {part} is not readable Parquet"):
        load_snapshot(str(root), verify=False)


def test_out_is_a_file_is_refused_before_writing(tmp_path: Path, data) -> None:
    _, split, user_ids, item_ids = data
    out = tmp_path / "lake"
    out.write_text("keep")
    with pytest.raises(DataError, match=rf"cannot write {out}/snap: {out} is a file, not a folder"):
        write_snapshot(str(out / "snap"), user_ids, item_ids, split)
    assert out.read_text() == "keep"


def test_out_not_writable_is_refused_before_writing(tmp_path: Path, data, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    _, split, user_ids, item_ids = data
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(ro) else real(p, mode))
    with pytest.raises(DataError, match=rf"cannot write {ro}/snap: no permission to write in {ro}"):
        write_snapshot(str(ro / "snap"), user_ids, item_ids, split)
    assert list(ro.iterdir()) == []


def test_content_digest_is_the_tables_only() -> None:
    """Two builds of the same tables (another run folder, master, inputs' paths) share the content digest; any
    file's bytes, name or table change it. The manifest digest tells the builds apart."""
    files = {"run-a/train/part-00000.parquet": {"sha256": "1" * 64, "rows": 3},
             "run-a/users/part-00000.parquet": {"sha256": "2" * 64, "rows": 2}}
    a = {"run": "run-a", "files": files, "config": {"spark_master": "local[2]"}}
    b = {"run": "run-b", "config": {"spark_master": "spark://h:7077"},
         "files": {k.replace("run-a", "run-b"): v for k, v in reversed(list(files.items()))}}
    assert snapshot.content_digest(a) == snapshot.content_digest(b)
    assert snapshot.manifest_digest(a) != snapshot.manifest_digest(b)
    other_bytes = {**files, "run-a/train/part-00000.parquet": {"sha256": "3" * 64, "rows": 3}}
    renamed = {k.replace("part-00000", "part-00001") if "train" in k else k: v for k, v in files.items()}
    for changed in (other_bytes, renamed):
        assert snapshot.content_digest({**a, "files": changed}) != snapshot.content_digest(a)
