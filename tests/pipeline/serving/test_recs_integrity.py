"""Readers verify each part against the sha256 its manifest records before returning any of its rows: one flipped
byte used to change a user's scores silently. Every read path refuses a damaged part with one DataError naming the
file and the fix; parts that are not damaged stay readable; a part is verified once, then looked up by range."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
from infer_support import events_table, run_infer, tiny_bundle, write_events

from pipeline.errors import DataError
from pipeline.io import lake
from pipeline.serving import recs
from pipeline.serving.job import InferJob
from pipeline.serving.recs import iter_recommendations, read_recommendations, user_recommendations

DAY = "2024-05-03"


def publish(out: str, events_root: str) -> dict:
    events = write_events(events_table(n_users=60), events_root)
    job = InferJob(date=dt.date.fromisoformat(DAY), events=events, out=out, device="cpu", top_n=5,  # type: ignore[arg-type]
                   progress=False, shard_events=60)
    return run_infer(job, tiny_bundle(), "7")


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


def users_of(path: str) -> list[int]:
    return pq.read_table(path, columns=["user_id"])["user_id"].to_pylist()


def test_a_flipped_byte_is_refused_by_every_read_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.cli.main import main

    m = publish(str(tmp_path), str(tmp_path / "events"))
    assert len(m["files"]) > 2
    run_dir = tmp_path / "recommendations" / f"dt={DAY}" / m["run"]
    damaged, intact = run_dir / m["files"][1]["path"], run_dir / m["files"][0]["path"]
    victim, other = users_of(str(damaged))[0], users_of(str(intact))[0]
    before = user_recommendations(str(tmp_path), DAY, victim)  # read (and verified) before the damage
    data = damaged.read_bytes()
    damaged.write_bytes(flip(data, len(data) // 2))  # one bit, in the middle of the file

    message = rf"recommendation part .*{damaged.name} does not match the sha256 in its manifest.*Fix: re-run inference for {DAY}"
    with pytest.raises(DataError, match=message):
        read_recommendations(str(tmp_path), DAY)
    with pytest.raises(DataError, match=message):
        read_recommendations(str(tmp_path), "latest", user_ids=[victim])
    with pytest.raises(DataError, match=message):
        user_recommendations(str(tmp_path), DAY, victim)
    with pytest.raises(DataError, match=message):
        list(iter_recommendations(str(tmp_path), DAY))
    capsys.readouterr()
    assert main(["recs", "--date", DAY, "--user", str(victim), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and damaged.name in err and f"re-run inference for {DAY}" in err
    # a lookup opens only the parts that can hold its users: the intact ones still answer
    assert user_recommendations(str(tmp_path), DAY, other)["user_id"] == other
    damaged.write_bytes(data)  # restored: the same bytes read the same again
    assert user_recommendations(str(tmp_path), DAY, victim) == before


def test_a_truncated_or_missing_checksum_part_is_refused(tmp_path: Path) -> None:
    import json

    m = publish(str(tmp_path), str(tmp_path / "events"))
    part = tmp_path / "recommendations" / f"dt={DAY}"
    target = part / m["run"] / m["files"][0]["path"]
    data = target.read_bytes()
    target.write_bytes(data[:-10])
    with pytest.raises(DataError, match=rf"{target.name} has {len(data) - 10} bytes, its manifest says {len(data)}"):
        read_recommendations(str(tmp_path), DAY)
    target.write_bytes(data)
    # a manifest without checksums (rewritten by hand): nothing can be verified, so nothing is returned
    manifest = json.loads((part / m["run"] / "_manifest.json").read_bytes())
    for f in manifest["files"]:
        f.pop("sha256")
    lake.resolve(str(part / m["run"] / "_manifest.json")).write_bytes(json.dumps(manifest).encode())
    with pytest.raises(DataError, match="has no checksum in its manifest"):
        read_recommendations(str(tmp_path), DAY)


def test_parts_are_verified_once_then_read_by_range(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m = publish(str(tmp_path), str(tmp_path / "events"))
    whole = []
    real = recs.hashlib.sha256
    monkeypatch.setattr(recs, "hashlib", SimpleNamespace(sha256=lambda data: whole.append(len(data)) or real(data)))
    recs._VERIFIED.clear()
    users = read_recommendations(str(tmp_path), DAY)["user_id"].to_pylist()
    assert len(whole) == len(m["files"])  # each part hashed once for the whole read
    for u in users[:10]:
        user_recommendations(str(tmp_path), DAY, u)
    assert len(whole) == len(m["files"])  # lookups of verified parts hash nothing again


def test_a_flipped_byte_on_s3_is_refused(s3_bucket: str, tmp_path: Path) -> None:
    out = f"{s3_bucket}/lake"
    m = publish(out, f"{s3_bucket}/events")
    loc = lake.resolve(out).join("recommendations", f"dt={DAY}", m["run"], m["files"][0]["path"])
    data = loc.read_bytes()
    assert read_recommendations(out, DAY).num_rows == m["rows"]  # verified, and remembered with its size and mtime
    time.sleep(1.1)  # S3 times have whole seconds: the overwrite gets a new one
    loc.write_bytes(flip(data, len(data) // 3))
    with pytest.raises(DataError, match=rf"{m['files'][0]['path']} does not match the sha256 in its manifest"):
        read_recommendations(out, DAY)
    with pytest.raises(DataError, match="does not match the sha256"):
        list(iter_recommendations(out, DAY))
