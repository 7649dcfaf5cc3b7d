"""pipeline.io.publish: `recsys infer` killed (SIGKILL) at several points leaves readers the previous complete
partition or none, never a partial one; the next run cleans up what the killed one left."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from infer_support import events_table, tiny_bundle, write_events

from pipeline.errors import DataError
from pipeline.io.lake import resolve
from pipeline.io.publish import SUCCESS, PartitionWriter, committed_run
from pipeline.serving.job import InferJob, publish_recommendations
from pipeline.serving.recs import read_recommendations

REPO = Path(__file__).resolve().parents[3]
DAY = "2024-05-03"
# (hook point, whether the new run is visible after the kill)
POINTS = [("spilled", False), ("part-0", False), ("manifest", False), ("success", True)]


def _infer_cmd(events: str, out: Path, model: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli.main", "infer", "--date", DAY, "--events", events, "--out", str(out),
            "--model", str(model), "--device", "cpu", "--top-n", "5", "--no-progress", "--shard-events", "100"]


def test_sigkill_at_any_point_leaves_previous_or_new_complete_partition(tmp_path: Path) -> None:
    bundle = tiny_bundle()
    events = write_events(events_table(n_users=60), str(tmp_path / "events"))
    model = bundle.save(tmp_path / "bundle")
    # the previous partition: same data, another model version, so we can tell which run a reader sees
    base = tmp_path / "base"
    prev = publish_recommendations(InferJob(date=DAY, events=events, out=str(base), device="cpu", top_n=5,  # type: ignore[arg-type]
                                            progress=False, shard_events=100), bundle, "previous")
    assert prev.manifest()["shards"] >= 2
    cases = [(point, visible, with_prev) for point, visible in POINTS for with_prev in (True, False)
             if with_prev or point == "part-0"]
    procs = []
    for point, visible, with_prev in cases:  # all killed runs in parallel: each in its own lake
        out = tmp_path / f"{point}-{with_prev}"
        if with_prev:
            shutil.copytree(base, out)
        else:
            out.mkdir()
        marker = tmp_path / f"{point}-{with_prev}.hit"
        env = {**os.environ, "RECSYS_HOOK_POINT": point, "RECSYS_HOOK_FILE": str(marker), "RECSYS_HOOK_SLEEP": "120",
               "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        procs.append((point, visible, with_prev, out, marker,
                      subprocess.Popen(_infer_cmd(events, out, model), cwd=REPO, env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT)))
    deadline = time.time() + 120
    for point, visible, with_prev, out, marker, proc in procs:
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"{point}: the process ended before its hook: {proc.stdout.read().decode()[-2000:]}")  # type: ignore[union-attr]
            assert time.time() < deadline, f"{point}: hook never reached"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        if visible:  # killed after the commit: the new run is complete and visible (the old folder may linger)
            got = read_recommendations(str(out), DAY)
            assert got.num_rows == prev.users and set(got["model_version"].to_pylist()) == {got["model_version"][0].as_py()}
            assert got["model_version"][0].as_py().startswith("local-")
        elif with_prev:  # killed before the commit: readers still see the whole previous partition
            got = read_recommendations(str(out), DAY)
            assert got.num_rows == prev.users and set(got["model_version"].to_pylist()) == {"previous"}
        else:  # no previous partition: readers see none
            with pytest.raises(DataError, match="no committed recommendations"):
                read_recommendations(str(out), DAY)
            with pytest.raises(DataError, match="no committed recommendations"):
                read_recommendations(str(out), "latest")
    # a later run replaces whatever the killed one left: one run folder, committed
    out = tmp_path / "part-0-True"
    m = publish_recommendations(InferJob(date=DAY, events=events, out=str(out), device="cpu", top_n=5,  # type: ignore[arg-type]
                                         progress=False, shard_events=100), bundle, "again")
    part = out / "recommendations" / f"dt={DAY}"
    assert sorted(p.name for p in part.iterdir()) == sorted([SUCCESS, m.run])


def test_commit_pointer_is_verified(tmp_path: Path) -> None:
    import pyarrow as pa

    part = resolve(tmp_path / "recommendations" / "dt=2024-01-01")
    w = PartitionWriter(part)
    w.write_part(pa.table({"user_id": [1]}))
    assert committed_run(part) is None  # nothing visible before commit
    w.commit({"model_version": "1"})
    run_dir, manifest = committed_run(part)  # type: ignore[misc]
    assert manifest["rows"] == 1 and run_dir.path.endswith(w.run_name)
    (Path(run_dir.path) / "_manifest.json").write_text("{}")  # tampered manifest: the pointer's checksum catches it
    with pytest.raises(DataError, match="does not match"):
        committed_run(part)


def test_unreadable_commit_pointers(tmp_path: Path) -> None:
    import pyarrow as pa

    part = resolve(tmp_path / "recommendations" / "dt=2024-01-01")
    w = PartitionWriter(part)
    w.write_part(pa.table({"user_id": [1]}))
    w.commit({"model_version": "1"})
    success = Path(part.path) / SUCCESS
    good = success.read_text()
    for bad in ("not json", '{"run": "run-gone", "manifest_sha256": "x"}', '{"no_run": 1}', '["run-x"]',
                '{"run": "../escape"}'):
        success.write_text(bad)
        with pytest.raises(DataError, match=r"unreadable commit|unsafe path"):
            committed_run(part)
    success.write_text(good)
    assert committed_run(part) is not None


def test_commit_read_survives_a_rerun_between_pointer_and_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A re-run commits (and deletes the old run) after a reader read `_SUCCESS` but before it read the manifest:
    the reader reads the pointer again and gets the new run, instead of failing."""
    import pyarrow as pa

    from pipeline.io import lake

    part = resolve(tmp_path / "recommendations" / "dt=2024-01-01")
    first = PartitionWriter(part)
    first.write_part(pa.table({"user_id": [1]}))
    first.commit({"model_version": "1"})
    stale = (Path(part.path) / SUCCESS).read_bytes()
    second = PartitionWriter(part)
    second.write_part(pa.table({"user_id": [1, 2]}))
    second.commit({"model_version": "2"})  # deletes the first run's folder
    assert not Path(first.run_dir.path).exists()

    real = lake.Location.read_bytes
    reads = []

    def racing(self: lake.Location) -> bytes:
        reads.append(self.path)
        if self.path.endswith(SUCCESS) and len(reads) == 1:
            return stale  # the pointer as it was before the re-run committed
        return real(self)

    monkeypatch.setattr(lake.Location, "read_bytes", racing)
    run_dir, manifest = committed_run(part)  # type: ignore[misc]
    assert manifest["model_version"] == "2" and run_dir.path == second.run_dir.path
    assert sum(p.endswith(SUCCESS) for p in reads) == 2


def test_parts_written_concurrently_are_named_and_listed_by_number(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow as pa

    part = resolve(tmp_path / "recommendations" / "dt=2024-01-01")
    w = PartitionWriter(part)
    with ThreadPoolExecutor(4) as pool:  # finishing in any order
        list(pool.map(lambda n: w.write_part(pa.table({"user_id": list(range(n + 1))}), part=n, shard=n), [7, 3, 0, 5, 1]))
    with pytest.raises(ValueError, match=r"part-00003\.parquet was written twice"):
        w.write_part(pa.table({"user_id": [1]}), part=3)
    m = w.commit({"model_version": "1"})
    assert [f["path"] for f in m["files"]] == [f"part-{n:05d}.parquet" for n in (0, 1, 3, 5, 7)]
    assert [f["rows"] for f in m["files"]] == [1, 2, 4, 6, 8] and m["rows"] == 21
    assert sorted(p.name for p in Path(w.run_dir.path).iterdir()) == sorted([*(f["path"] for f in m["files"]), "_manifest.json"])


def test_parts_encode_scores_by_byte_stream_split_and_read_back_unchanged(tmp_path: Path) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    n, k = 500, 20
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    table = pa.table({
        "user_id": pa.array(np.arange(n, dtype=np.int64) * 3),
        "item_ids": pa.ListArray.from_arrays(offsets, pa.array(rng.integers(0, 50, n * k))),
        "scores": pa.ListArray.from_arrays(offsets, pa.array(-np.sort(-rng.random(n * k)).astype(np.float32))),
        "model_version": pa.array(["4"] * n), "fallback": pa.array(np.zeros(n, bool))})
    w = PartitionWriter(resolve(tmp_path / "recommendations" / "dt=2024-01-01"))
    entry = w.write_part(table, part=0)
    f = pq.ParquetFile(Path(w.run_dir.path) / entry["path"])
    assert f.read().equals(table)
    enc = {c.path_in_schema: set(c.encodings) for c in (f.metadata.row_group(0).column(i) for i in range(5))}
    assert "BYTE_STREAM_SPLIT" in enc["scores.list.element"] and "RLE_DICTIONARY" not in enc["scores.list.element"]
    assert "RLE_DICTIONARY" in enc["item_ids.list.element"] and "RLE_DICTIONARY" in enc["model_version"]
    again = PartitionWriter(resolve(tmp_path / "recommendations" / "dt=2024-01-02")).write_part(table, part=0)
    assert again["sha256"] == entry["sha256"]  # same table, same bytes (re-runs compare by checksum)


def _users(root: Path, day: str) -> list[int]:
    return sorted(read_recommendations(str(root), day)["user_id"].to_pylist())


def _overlap_setup(tmp_path: Path) -> tuple[Path, str, PartitionWriter, PartitionWriter]:
    """A committed previous partition, then run A and a later-started run B of the same date, both writing."""
    import pyarrow as pa

    day = "2024-01-01"
    part = resolve(tmp_path / "recommendations" / f"dt={day}")
    prev = PartitionWriter(part)
    prev.write_part(pa.table({"user_id": [9]}))
    prev.commit({"model_version": "prev"})
    a, b = PartitionWriter(part), PartitionWriter(part)
    assert a.run_name < b.run_name  # run ids sort by start time
    a.write_part(pa.table({"user_id": [1]}), part=0)
    a.write_part(pa.table({"user_id": [2]}), part=1)
    b.write_part(pa.table({"user_id": [10]}), part=0)
    return tmp_path, day, a, b


def test_overlapping_runs_older_commits_first_then_newer(tmp_path: Path) -> None:
    """A commits while B still writes: A's cleanup leaves B's folder alone, B commits its full data and removes A."""
    import pyarrow as pa

    root, day, a, b = _overlap_setup(tmp_path)
    a.commit({"model_version": "a"})
    assert _users(root, day) == [1, 2] and Path(b.run_dir.path).is_dir()
    b.write_part(pa.table({"user_id": [11]}), part=1)
    b.commit({"model_version": "b"})
    assert _users(root, day) == [10, 11]
    assert sorted(p.name for p in Path(b.partition.path).iterdir()) == sorted([SUCCESS, b.run_name])


def test_overlapping_runs_newer_commits_first_older_is_refused(tmp_path: Path) -> None:
    """B commits first (deleting A's folder); A writes on and commits: a clear error, B's partition untouched."""
    import pyarrow as pa

    root, day, a, b = _overlap_setup(tmp_path)
    b.commit({"model_version": "b"})
    assert not Path(a.run_dir.path).exists()
    a.write_part(pa.table({"user_id": [3]}), part=2)  # recreates A's folder with one part of three
    success = (Path(b.partition.path) / SUCCESS).read_bytes()
    with pytest.raises(DataError, match=r"was not published \(part-00000\.parquet.* vanished.*Fix: .*re-run"):
        a.commit({"model_version": "a"})
    assert (Path(b.partition.path) / SUCCESS).read_bytes() == success
    assert _users(root, day) == [10]
    assert sorted(p.name for p in Path(b.partition.path).iterdir()) == sorted([SUCCESS, b.run_name])


def test_an_older_run_does_not_replace_a_newer_commit(tmp_path: Path) -> None:
    """B commits before A wrote anything (so nothing of A was deleted): A still may not replace B."""
    import pyarrow as pa

    part = resolve(tmp_path / "recommendations" / "dt=2024-01-01")
    a, b = PartitionWriter(part), PartitionWriter(part)
    b.write_part(pa.table({"user_id": [10]}))
    b.commit({"model_version": "b"})
    a.write_part(pa.table({"user_id": [1]}))
    with pytest.raises(DataError, match=rf"newer run, {b.run_name}, has committed"):
        a.commit({"model_version": "a"})
    assert _users(tmp_path, "2024-01-01") == [10]
    assert sorted(p.name for p in Path(part.path).iterdir()) == sorted([SUCCESS, b.run_name])


def test_run_ids_sort_by_start_time() -> None:
    from pipeline.io.publish import new_run_id

    ids = [new_run_id() for _ in range(2000)]  # many within one microsecond tick: still strictly increasing
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert ids[0] > "20200101T000000-0a1b2c3d"  # a run named by the old second-precision format is older


def test_parts_and_manifest_are_durable_before_success(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow as pa

    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        real_replace(src, dst)
        events.append(("replace", str(dst)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    part = resolve(tmp_path / "recommendations" / "dt=2024-01-01")
    w = PartitionWriter(part)
    w.write_part(pa.table({"user_id": [1]}))
    w.write_part(pa.table({"user_id": [2]}))
    w.commit({"model_version": "1"})
    committed = events.index(("replace", str(Path(part.path) / SUCCESS)))
    before = {path for kind, path in events[:committed] if kind == "fsync"}
    run_dir = Path(w.run_dir.path)
    assert {str(run_dir / n) for n in ("part-00000.parquet", "part-00001.parquet", "_manifest.json")} <= before
    assert {str(run_dir), part.path} <= before  # the new names, and the run folder's own entry
    assert ("fsync", part.path) in events[committed:]  # the rename of _SUCCESS itself


@pytest.mark.parametrize("target, body, problem", [
    (SUCCESS, "{trunc", r"_SUCCESS is not JSON \(Expecting property name"),
    (SUCCESS, '{"manifest_sha256": "x"}', r"_SUCCESS names no run"),
    ("manifest", "{trunc", r"run-[^/]+/_manifest\.json is not JSON"),
    ("manifest", "[]", r"run-[^/]+/_manifest\.json lists no files"),
    ("manifest", None, r"run-[^/]+/_manifest\.json, named by _SUCCESS, is missing"),
])
def test_corrupt_commit_files_name_the_file(tmp_path: Path, target: str, body: str | None, problem: str) -> None:
    """A corrupt or missing `_SUCCESS` / `_manifest.json` (a manifest rewritten with a matching pointer, so
    that the checksum alone does not catch it): one DataError naming the file, the fix a re-run."""
    import hashlib
    import json

    import pyarrow as pa

    part = resolve(tmp_path / "recommendations" / "dt=2024-01-01")
    w = PartitionWriter(part)
    w.write_part(pa.table({"user_id": [1]}))
    w.commit({"model_version": "1"})
    success, manifest = Path(part.path) / SUCCESS, Path(w.run_dir.path) / "_manifest.json"
    if target == SUCCESS:
        success.write_text(body)  # type: ignore[arg-type]
    elif body is None:
        manifest.unlink()
    else:
        manifest.write_text(body)
        pointer = json.loads(success.read_text())
        success.write_text(json.dumps({**pointer, "manifest_sha256": hashlib.sha256(body.encode()).hexdigest()}))
    with pytest.raises(DataError, match=rf"^partition {part.uri} has an unreadable commit: .*{problem}.*"
                                        r"Fix: re-run the job for that date\.$"):
        committed_run(part)


def test_out_that_is_a_file_or_not_writable_is_refused_before_any_write(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    out.write_text("keep")
    with pytest.raises(DataError, match=rf"cannot write {out}/recommendations/dt=2024-01-01: {out} is a file, not a folder"):
        PartitionWriter(resolve(out / "recommendations" / "dt=2024-01-01"))
    assert out.read_text() == "keep"
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(ro) else real(p, mode))
    with pytest.raises(DataError, match=rf"no permission to write in {ro}\. Fix: pass a folder this user can write to"):
        PartitionWriter(resolve(ro / "recommendations" / "dt=2024-01-01"))
    assert list(ro.iterdir()) == []


def test_a_failing_abort_does_not_replace_the_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """The engines call abort() while an error propagates: when the clean-up fails too (S3 down), the original
    error is what the user sees, and the uncommitted folder is left for the date's next run."""
    import pyarrow as pa

    from pipeline.io import lake

    w = PartitionWriter(resolve(tmp_path / "recommendations" / "dt=2024-01-01"))
    w.write_part(pa.table({"user_id": [1]}))

    def fail(self: lake.Location) -> None:
        raise DataError("S3 endpoint http://127.0.0.1:9 unreachable after 3 tries", "check AWS_ENDPOINT_URL / network")

    monkeypatch.setattr(lake.Location, "delete", fail)
    with pytest.raises(RuntimeError, match="the original failure"):
        try:
            raise RuntimeError("the original failure")
        except RuntimeError:
            w.abort()
            raise
    assert "could not remove the uncommitted run" in caplog.text and Path(w.run_dir.path).is_dir()
