"""pipeline.io.publish: a date is published as one commit of the Delta table. `recsys infer` killed (SIGKILL) at
several points leaves readers the previous complete date or none, never a partial one; a re-run replaces, never
duplicates; two writers racing for a date: one wins, the other gets a clear error and leaves nothing behind."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from infer_support import events_table, tiny_bundle, write_events

from pipeline.errors import DataError
from pipeline.io import delta_table
from pipeline.io.lake import resolve
from pipeline.io.publish import PartitionWriter
from pipeline.serving.job import InferJob, publish_recommendations
from pipeline.serving.recs import read_recommendations

REPO = Path(__file__).resolve().parents[3]
DAY = "2024-05-03"
# (hook point, whether the new run is visible after the kill)
POINTS = [("spilled", False), ("part-0", False), ("manifest", False), ("delta-read", False), ("commit", True)]


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
    # a later run replaces whatever the killed one left: only its files are live (the killed run's stay invisible)
    out = tmp_path / "part-0-True"
    m = publish_recommendations(InferJob(date=DAY, events=events, out=str(out), device="cpu", top_n=5,  # type: ignore[arg-type]
                                         progress=False, shard_events=100), bundle, "again")
    assert {p.split("/")[1] for p in _live(out)} == {m.run} and m.version == prev.version + 1
    assert read_recommendations(str(out), DAY).num_rows == prev.users


def _live(out: Path) -> list[str]:
    table = delta_table.open_table(resolve(out / "recommendations"))
    return [] if table is None else delta_table.live_files(table)["path"].to_pylist()


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


def test_parts_write_scores_plain_without_a_dictionary_and_read_back_unchanged(tmp_path: Path) -> None:
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
    # PLAIN, not BYTE_STREAM_SPLIT: Spark before 4.1 (EMR's) cannot read that; no dictionary: scores are all distinct
    assert "PLAIN" in enc["scores.list.element"] and not enc["scores.list.element"] & {"RLE_DICTIONARY", "BYTE_STREAM_SPLIT"}
    assert "RLE_DICTIONARY" in enc["item_ids.list.element"] and "RLE_DICTIONARY" in enc["model_version"]
    again = PartitionWriter(resolve(tmp_path / "recommendations" / "dt=2024-01-02")).write_part(table, part=0)
    assert again["sha256"] == entry["sha256"]  # same table, same bytes (re-runs compare by checksum)


def _users(root: Path | str, day: str) -> list[int]:
    return sorted(read_recommendations(str(root), day)["user_id"].to_pylist())


def _commit(root: Path | str, day: str, users: list[int], version: str) -> PartitionWriter:
    import pyarrow as pa

    w = PartitionWriter(resolve(f"{root}/recommendations/dt={day}"))
    w.write_part(pa.table({"user_id": pa.array(users, pa.int64())}), user_min=min(users), user_max=max(users))
    w.commit({"model_version": version})
    return w


def test_a_rerun_replaces_the_date_in_one_commit_and_keeps_the_old_files(tmp_path: Path) -> None:
    import pyarrow as pa

    first = _commit(tmp_path, "2024-01-01", [9], "prev")
    _commit(tmp_path, "2024-01-02", [5], "other")
    w = PartitionWriter(resolve(tmp_path / "recommendations" / "dt=2024-01-01"))
    w.write_part(pa.table({"user_id": pa.array([1], pa.int64())}), part=0)
    w.write_part(pa.table({"user_id": pa.array([2], pa.int64())}), part=1)
    assert _users(tmp_path, "2024-01-01") == [9]  # staged, not visible
    m = w.commit({"model_version": "new", "precision": "fp32"})
    assert m["version"] == 2 and _users(tmp_path, "2024-01-01") == [1, 2] and _users(tmp_path, "2024-01-02") == [5]
    assert Path(first.run_dir.path).is_dir()  # replaced, not deleted: restore needs it until a vacuum
    table = delta_table.open_table(resolve(tmp_path / "recommendations"))
    assert table is not None and table.version() == 2
    facts = delta_table.commit_facts(table.history(1)[0])  # the manifest's facts, in the commit
    assert facts is not None and facts["run"] == w.run_name and facts["model_version"] == "new"
    assert facts["precision"] == "fp32" and facts["rows"] == 2 and facts["dt"] == "2024-01-01" and "files" not in facts
    assert json.loads((Path(w.run_dir.path) / "_manifest.json").read_text())["files"][1]["sha256"]


def _race(root: str, day: str, previous: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two writers of `day` read the table, both wait (the `delta-read` hook), then both commit."""
    import threading

    import pyarrow as pa

    _commit(root, "2024-01-09", [7], "other date")
    if previous:
        _commit(root, day, [9], "prev")
    before = delta_table.open_table(resolve(f"{root}/recommendations"))
    assert before is not None
    monkeypatch.setenv("RECSYS_HOOK_POINT", "delta-read")
    monkeypatch.setenv("RECSYS_HOOK_SLEEP", "1.5")  # both have read the table before either commits
    writers = [PartitionWriter(resolve(f"{root}/recommendations/dt={day}")) for _ in range(2)]
    for k, w in enumerate(writers):
        w.write_part(pa.table({"user_id": pa.array([10 * k + 1, 10 * k + 2], pa.int64())}))
    outcome: dict[int, BaseException | None] = {}
    gate = threading.Barrier(2)

    def go(k: int) -> None:
        gate.wait()
        try:
            writers[k].commit({"model_version": f"w{k}"})
            outcome[k] = None
        except BaseException as e:
            outcome[k] = e

    threads = [threading.Thread(target=go, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    monkeypatch.delenv("RECSYS_HOOK_POINT")
    errors = [e for e in outcome.values() if e is not None]
    assert len(outcome) == 2 and len(errors) == 1, outcome
    assert isinstance(errors[0], DataError)
    assert re.search(rf"the commit of {day} to the Delta table at .* lost to a concurrent commit of the same date.*"
                     r"this run's files were not published\. Fix: let one run per date finish", str(errors[0]))
    winner = next(k for k, e in outcome.items() if e is None)
    loser = writers[1 - winner]
    after = delta_table.open_table(resolve(f"{root}/recommendations"))
    assert after is not None and after.version() == before.version() + 1  # exactly one version for one commit
    assert _users(root, day) == [10 * winner + 1, 10 * winner + 2]  # one complete run, no duplicates
    assert {p.split("/")[1] for p in delta_table.live_files(after, dt.date.fromisoformat(day))["path"].to_pylist()} == {
        writers[winner].run_name}
    assert not loser.run_dir.exists()  # the loser's staged files are removed
    assert _users(root, "2024-01-09") == [7]  # other dates untouched


@pytest.mark.parametrize("previous", [True, False], ids=["replacing-a-date", "a-new-date"])
def test_two_writers_racing_for_a_date_on_local_disk(tmp_path: Path, previous: bool,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    _race(str(tmp_path), "2024-01-01", previous, monkeypatch)


@pytest.mark.parametrize("previous", [True, False], ids=["replacing-a-date", "a-new-date"])
def test_two_writers_racing_for_a_date_on_s3(s3_bucket: str, previous: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the moto server: commits are conditional PUTs (delta_table.storage_options), the conflict check the same."""
    _race(f"{s3_bucket}/lake", "2024-01-01", previous, monkeypatch)


def test_moto_honours_conditional_puts(s3_bucket: str, moto_server: str) -> None:
    """What the S3 commit mode relies on: a PUT with If-None-Match: * of an existing key fails (AWS S3 since 2024)."""
    import boto3
    from botocore.exceptions import ClientError

    s3 = boto3.client("s3", endpoint_url=moto_server)
    bucket = s3_bucket.removeprefix("s3://")
    s3.put_object(Bucket=bucket, Key="k", Body=b"1", IfNoneMatch="*")
    with pytest.raises(ClientError, match="PreconditionFailed"):
        s3.put_object(Bucket=bucket, Key="k", Body=b"2", IfNoneMatch="*")
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"1"


def test_unsafe_s3_renames_are_refused(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_S3_ALLOW_UNSAFE_RENAME", "true")
    with pytest.raises(DataError, match=r"AWS_S3_ALLOW_UNSAFE_RENAME is set.*Fix: unset AWS_S3_ALLOW_UNSAFE_RENAME"):
        _commit(f"{s3_bucket}/lake", "2024-01-01", [1], "v")
    monkeypatch.delenv("AWS_S3_ALLOW_UNSAFE_RENAME")
    assert delta_table.open_table(resolve(f"{s3_bucket}/lake/recommendations")) is None  # nothing committed
    assert not resolve(f"{s3_bucket}/lake/recommendations/dt=2024-01-01").list()  # nor left staged


def test_a_table_with_another_schema_is_refused(tmp_path: Path) -> None:
    import pyarrow as pa

    _commit(tmp_path, "2024-01-01", [1], "v")
    w = PartitionWriter(resolve(tmp_path / "recommendations" / "dt=2024-01-02"))
    w.write_part(pa.table({"user_id": pa.array(["a"]), "extra": pa.array([1])}))
    with pytest.raises(DataError, match=r"the Delta table at .*recommendations has another schema \(columns user_id: "
                                        r"\"long\", dt: \"date\"; .*than this run's files \(columns user_id: "
                                        r"\"string\", extra: \"long\", dt: \"date\".*Fix: publish to another --out"):
        w.commit({"model_version": "v"})
    table = delta_table.open_table(resolve(tmp_path / "recommendations"))
    assert table is not None and table.version() == 0 and not w.run_dir.exists()  # nothing committed, nothing left
    # a partition column in the parts: refused before the table is touched
    w = PartitionWriter(resolve(tmp_path / "recommendations" / "dt=2024-01-02"))
    w.write_part(pa.table({"user_id": pa.array([1]), "dt": pa.array(["2024-01-02"])}))
    with pytest.raises(DataError, match=r"has a 'dt' column in its parts.*Fix: drop the 'dt' column"):
        w.commit({"model_version": "v"})
    assert table.version() == 0 and not w.run_dir.exists()


def test_run_ids_sort_by_start_time() -> None:
    from pipeline.io.publish import new_run_id

    ids = [new_run_id() for _ in range(2000)]  # many within one microsecond tick: still strictly increasing
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert ids[0] > "20200101T000000-0a1b2c3d"  # a run named by the old second-precision format is older


def test_parts_and_manifest_are_durable_before_the_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow as pa

    from pipeline.io import publish

    events: list[tuple[str, str]] = []
    real_fsync, real_commit = os.fsync, publish.delta_table.commit_date

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def commit(*args: object, **kwargs: object) -> int:
        events.append(("commit", ""))
        return real_commit(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(publish.delta_table, "commit_date", commit)
    part = resolve(tmp_path / "recommendations" / "dt=2024-01-01")
    w = PartitionWriter(part)
    w.write_part(pa.table({"user_id": [1]}))
    w.write_part(pa.table({"user_id": [2]}))
    w.commit({"model_version": "1"})
    committed = events.index(("commit", ""))
    before = {path for kind, path in events[:committed] if kind == "fsync"}
    run_dir = Path(w.run_dir.path)
    assert {str(run_dir / n) for n in ("part-00000.parquet", "part-00001.parquet", "_manifest.json")} <= before
    assert {str(run_dir), part.path} <= before  # the new names, and the run folder's own entry


@pytest.mark.parametrize("body, problem", [
    ("{trunc", r"have an unreadable manifest: .*run-[^/]+/_manifest\.json is not JSON \(Expecting property name"),
    ("[]", r"have an unreadable manifest: .*run-[^/]+/_manifest\.json lists no files"),
    ('{"files": []}', r"part-00000\.parquet .*is not listed in _manifest\.json of its run"),
    (None, r"have no manifest: .*run-[^/]+/_manifest\.json is missing"),
])
def test_a_corrupt_or_missing_manifest_names_the_file(tmp_path: Path, body: str | None, problem: str) -> None:
    """The lookup index and the checksums are in the committed run's manifest: a corrupt or missing one is one
    DataError naming the file and the fix, never rows read unverified."""
    w = _commit(tmp_path, "2024-01-01", [1], "1")
    manifest = Path(w.run_dir.path) / "_manifest.json"
    if body is None:
        manifest.unlink()
    else:
        manifest.write_text(body)
    with pytest.raises(DataError, match=rf"{problem}.*Fix: re-run inference for 2024-01-01"):
        read_recommendations(str(tmp_path), "2024-01-01")


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
