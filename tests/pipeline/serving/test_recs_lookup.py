"""pipeline.serving.recs lookups: a few users open only the parts that can hold them (shard index, user ranges), give
the same rows as a full read, and still work on partitions written without an index; whole dates stream."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from infer_support import events_table, run_infer, tiny_bundle, write_events

from pipeline.errors import DataError
from pipeline.io import lake, publish
from pipeline.io.publish import MANIFEST, PartitionWriter
from pipeline.serving.job import InferJob
from pipeline.serving.recs import files_for_users, iter_recommendations, read_recommendations
from pipeline.serving.sharding import INT_SCHEME, STRING_SCHEME, shard_of, user_hash

DAY = "2024-05-03"


def publish_day(root: Path, string_users: bool) -> dict:
    events = write_events(events_table(n_users=90, string_users=string_users), str(root / "events"))
    job = InferJob(date=dt.date.fromisoformat(DAY), events=events, out=str(root), device="cpu", top_n=5,  # type: ignore[arg-type]
                   progress=False, shard_events=40)
    return run_infer(job, tiny_bundle(), "7")


@pytest.fixture(scope="module", params=[False, True], ids=["int-users", "string-users"])
def day(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, bool]:
    root = tmp_path_factory.mktemp("lake")
    return root, publish_day(root, request.param), request.param


def part_users(root: Path, manifest: dict) -> dict[str, list]:
    run_dir = root / "recommendations" / f"dt={DAY}" / manifest["run"]
    return {f["path"]: pq.read_table(run_dir / f["path"], columns=["user_id"])["user_id"].to_pylist()
            for f in manifest["files"]}


def test_manifest_indexes_every_part(day: tuple[Path, dict, bool]) -> None:
    root, m, string_users = day
    assert len(m["files"]) > 3, "the fixture must spread users over several parts"
    assert m["user_sharding"] == {"scheme": STRING_SCHEME if string_users else INT_SCHEME, "n_shards": m["shards"]}
    for f in m["files"]:
        users = part_users(root, m)[f["path"]]
        assert f["user_min"] == min(users) and f["user_max"] == max(users)
        assert users == sorted(users), "parts are sorted by user (tight row-group statistics)"
        typed = pa.array(users, pa.string() if string_users else pa.int64())
        assert set(shard_of(typed, m["shards"]).tolist()) == {f["shard"]}


def test_each_lookup_opens_only_the_users_part(day: tuple[Path, dict, bool]) -> None:
    root, m, string_users = day
    where = {u: path for path, users in part_users(root, m).items() for u in users}
    full = read_recommendations(str(root), DAY)
    assert full.num_rows == len(where) == m["rows"]
    for u, path in where.items():
        wanted = pa.array([u], pa.string() if string_users else pa.int64())
        assert [f["path"] for f in files_for_users(m, wanted)] == [path]
        got = read_recommendations(str(root), DAY, user_ids=[u])
        assert got.to_pylist() == full.filter(pc.equal(full["user_id"], u)).to_pylist()
    some = list(where)[::7]
    got = read_recommendations(str(root), DAY, user_ids=some, columns=["item_ids", "scores"])
    assert got.column_names == ["item_ids", "scores"] and got.num_rows == len(some)
    absent = "nobody" if string_users else 10**12
    assert read_recommendations(str(root), DAY, user_ids=[absent]).num_rows == 0


def test_partitions_without_an_index_are_read_whole(day: tuple[Path, dict, bool], tmp_path: Path) -> None:
    """A partition published before the index (or by another writer): every part is a candidate."""
    root, m, string_users = day
    old = {**m, "files": [{k: v for k, v in f.items() if k not in ("shard", "user_min", "user_max")} for f in m["files"]]}
    old.pop("user_sharding")
    wanted = pa.array(["u3"] if string_users else [3], pa.string() if string_users else pa.int64())
    assert len(files_for_users(old, wanted)) == len(m["files"])
    # a scheme this reader does not know: the shard numbers are ignored, the user ranges still prune
    other = {**m, "user_sharding": {"scheme": "something-else", "n_shards": m["shards"]}}
    ranged = [f["path"] for f in m["files"] if f["user_min"] <= wanted[0].as_py() <= f["user_max"]]
    assert [f["path"] for f in files_for_users(other, wanted)] == ranged
    assert files_for_users(m, pa.array([], wanted.type)) == []

    # and end to end: strip the index from the committed run's manifest, read the same rows
    copy = tmp_path / "lake"
    shutil.copytree(root / "recommendations", copy / "recommendations")
    part = lake.resolve(str(copy / "recommendations" / f"dt={DAY}"))
    part.join(m["run"], MANIFEST).write_bytes(json.dumps(old, indent=2, sort_keys=True).encode())
    users = read_recommendations(str(root), DAY)["user_id"].to_pylist()[:10]
    assert (read_recommendations(str(copy), DAY, user_ids=users).sort_by("user_id").to_pylist()
            == read_recommendations(str(root), DAY, user_ids=users).sort_by("user_id").to_pylist())


def test_iter_streams_the_whole_date(day: tuple[Path, dict, bool]) -> None:
    root, m, _ = day
    batches = list(iter_recommendations(str(root), DAY, batch_size=4))
    assert len(batches) >= m["rows"] // 4 and all(b.num_rows <= 4 for b in batches)
    assert pa.Table.from_batches(batches).to_pylist() == read_recommendations(str(root), DAY).to_pylist()
    only = next(iter_recommendations(str(root), "latest", columns=["user_id"]))
    assert only.schema.names == ["user_id"]
    with pytest.raises(DataError, match="no committed recommendations for 2024-05-09"):
        next(iter_recommendations(str(root), "2024-05-09"))


def test_iter_reads_one_snapshot_and_stops_clearly_when_its_files_are_vacuumed(tmp_path: Path) -> None:
    """A re-run while a date is streamed: the stream goes on with the files it started on (the replaced run stays
    until a vacuum). A vacuum that deletes them mid-stream: a clear DataError, never rows of two runs."""
    from pipeline.serving.restore import VacuumJob

    m = publish_day(tmp_path, string_users=False)
    whole = read_recommendations(str(tmp_path), DAY)
    it = iter_recommendations(str(tmp_path), DAY, batch_size=2)
    first = next(it)
    again = publish_day(tmp_path, string_users=False)  # a re-run commits: the date's files are the new run's
    assert again["run"] != m["run"]
    assert pa.Table.from_batches([first, *it]).to_pylist() == whole.to_pylist()  # the old snapshot, whole
    it = iter_recommendations(str(tmp_path), DAY, batch_size=2)
    next(it)
    publish_day(tmp_path, string_users=False)
    assert VacuumJob(out=str(tmp_path), retain_hours=0).run().files > 0  # the run being read is deleted
    with pytest.raises(DataError, match="replaced by a re-run while being read"):
        list(it)


def test_writer_keeps_index_fields_and_small_row_groups(tmp_path: Path) -> None:
    w = PartitionWriter(lake.resolve(str(tmp_path / f"dt={DAY}")))
    n = publish.ROW_GROUP_ROWS * 2 + 5
    entry = w.write_part(pa.table({"user_id": np.arange(n)}), shard=3, user_min=0, user_max=n - 1)
    assert entry["shard"] == 3 and entry["user_min"] == 0 and entry["user_max"] == n - 1
    assert pq.ParquetFile(w.run_dir.join(entry["path"]).path).num_row_groups == 3


def splitmix_reference(u: int) -> int:
    """The integer scheme written out in plain Python (64-bit wrap-around)."""
    m = (1 << 64) - 1
    x = u & m
    x = ((x ^ (x >> 31)) * 0x9E3779B97F4A7C15) & m
    return x ^ (x >> 29)


def test_user_hash_is_stable() -> None:
    """Published partitions name their shard scheme, so the hash must not drift across versions of this code or of
    numpy/pandas. Integers: checked against the scheme written out in Python. Strings (pandas' SipHash with its
    fixed key): values pinned when the scheme was introduced; changing them needs a new scheme name."""
    ids = [0, 1, 42, 2**40, 2**63 - 1, -1, -(2**63)]
    assert user_hash(pa.array(ids, pa.int64())).tolist() == [splitmix_reference(u) for u in ids]
    assert user_hash(pa.array(["alice", "u1", ""], pa.string())).tolist() == [
        2073883683912626804, 2984610181246591869, 1760245841805064774]
    assert user_hash(pa.array(["alice"], pa.large_string())).tolist() == [2073883683912626804]
    assert shard_of(pa.array(ids, pa.int64()), 7).tolist() == [splitmix_reference(u) % 7 for u in ids]
