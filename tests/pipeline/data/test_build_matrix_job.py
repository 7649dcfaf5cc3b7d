"""The real Spark job (local[2]) end to end: snapshot content, determinism, re-runs, stable indices across
weeks, S3 output, real data, and the CLI."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.build_matrix import Binarize, BuildMatrixJob, BuildResult
from pipeline.data.synth_events import SynthEventsJob
from pipeline.errors import DataError
from pipeline.io.snapshot import load_snapshot, manifest_digest, read_manifest

WEEK1, WEEK2 = dt.date(2024, 1, 7), dt.date(2024, 1, 14)


def config(events: Path | str, lake: Path | str, as_of: dt.date = WEEK1, **kw) -> BuildMatrixJob:
    base = {"window_days": 7, "spark_master": "local[2]", "shuffle_partitions": 2, "seed": 7}
    return BuildMatrixJob(events=str(events), as_of=as_of, out=str(lake), **{**base, **kw})


@pytest.fixture(scope="module")
def events(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("events") / "events"
    SynthEventsJob(users=1500, items=400, days=14, out=str(root), seed=11).run()
    return root


@pytest.fixture(scope="module")
def lake(spark, events: Path, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lake")
    config(events, root).run()
    return root


def test_snapshot_content(lake: Path):
    uri = str(lake / "snapshots" / f"as_of={WEEK1}")
    snap = load_snapshot(uri)
    m = snap.manifest
    c = m["counts"]
    assert m["as_of"] == "2024-01-07" and m["window"] == {"start": "2024-01-01", "end": "2024-01-07", "days": 7,
                                                         "partitioned": True}
    assert len(m["inputs"]) == 7 and all(i["bytes"] > 0 for i in m["inputs"])
    assert all(r["passed"] for r in m["dq"]) and m["config"]["seed"] == 7
    assert snap.train.shape == (c["train_users"], c["items"]) and snap.train.nnz == c["train_interactions"]
    assert c["valid_users"] == round(0.1 * c["active_users"]) == snap.valid.n_users
    assert np.diff(snap.train.indptr).min() >= 1  # every train row has items (>= 5 before the split)
    assert (snap.train.sum(axis=0) > 0).all()  # first week: every column is a training item
    for h in (snap.valid, snap.test):
        n = np.diff(h.fold_in.indptr) + np.diff(h.targets.indptr)
        t = np.diff(h.targets.indptr)
        assert (t == np.where((np.floor(0.2 * n) == 0) & (n >= 2), 1, np.floor(0.2 * n))).all()
        assert h.fold_in.multiply(h.targets).nnz == 0
    assert len(set(snap.valid.users) & set(snap.test.users) & set(snap.train_users)) == 0


def test_rerun_is_identical_and_replaces(lake: Path, events: Path):
    uri = lake / "snapshots" / f"as_of={WEEK1}"
    before = read_manifest(str(uri))
    config(events, lake).run()
    after = read_manifest(str(uri))
    strip = lambda files: {k.split("/", 1)[1]: (v["sha256"], v["rows"]) for k, v in files.items()}  # noqa: E731
    assert before["run"] != after["run"] and strip(before["files"]) == strip(after["files"])
    # the replaced run stays for readers that read the old manifest a moment earlier
    assert sorted(p.name for p in uri.iterdir() if p.name.startswith("run-")) == sorted([before["run"], after["run"]])


def test_failed_cleanup_after_publish_keeps_the_new_run(lake: Path, events: Path, monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture):
    """Deleting old runs fails (S3 error, permissions) after the manifest switch: the build still succeeds and
    the manifest names a folder that exists; the old run is left for the next build."""
    from pipeline.io.lake import Location

    uri = lake / "snapshots" / f"as_of={WEEK1}"
    before = read_manifest(str(uri))
    stale = uri / "run-stale0000000"
    stale.mkdir()

    def fail(self: Location) -> None:
        raise OSError("AccessDenied")

    monkeypatch.setattr(Location, "delete", fail)
    assert config(events, lake).run().snapshot_uri == str(uri)
    after = load_snapshot(str(uri)).manifest  # verifies every file the manifest names
    assert after["run"] != before["run"] and (uri / after["run"]).is_dir() and (uri / before["run"]).is_dir()
    assert stale.is_dir() and "could not delete run-stale0000000" in caplog.text


def test_other_seed_other_split(lake: Path, events: Path, tmp_path: Path):
    a = load_snapshot(str(lake / "snapshots" / f"as_of={WEEK1}"))
    b = load_snapshot(config(events, tmp_path, seed=8).run().snapshot_uri)
    assert not np.array_equal(a.valid.users, b.valid.users)


def test_stable_indices_next_week(lake: Path, events: Path):
    w1 = load_snapshot(str(lake / "snapshots" / f"as_of={WEEK1}"))
    w2 = load_snapshot(config(events, lake, as_of=WEEK2).run().snapshot_uri)
    n1 = len(w1.item_ids)
    assert np.array_equal(w2.item_ids[:n1], w1.item_ids) and len(w2.item_ids) > n1  # new items appended
    assert np.array_equal(w2.user_ids[: len(w1.user_ids)], w1.user_ids)
    new_items = w2.item_ids[n1:]
    assert np.array_equal(new_items, np.sort(new_items))
    assert w2.manifest["previous_snapshot"].endswith(f"as_of={WEEK1}")
    assert w2.manifest["counts"]["new_items"] == len(w2.item_ids) - n1
    roles = _roles(lake, WEEK2)
    assert (roles == "inactive").sum() == w2.manifest["counts"]["inactive_users"] > 0  # week-1 users absent in week 2
    # both weeks' snapshots stay published side by side
    assert (lake / "snapshots" / f"as_of={WEEK1}" / "manifest.json").exists()


def _roles(lake: Path, day: dt.date) -> np.ndarray:
    import pyarrow.parquet as pq

    root = lake / "snapshots" / f"as_of={day}"
    m = read_manifest(str(root))
    rel = next(r for r in m["files"] if "/users/" in r)
    return pq.read_table(root / rel)["role"].to_numpy(zero_copy_only=False)


def test_s3_lake(spark, events: Path, s3_bucket: str):
    r = config(events, f"{s3_bucket}/lake").run()
    assert r.snapshot_uri == f"{s3_bucket}/lake/snapshots/as_of={WEEK1}"
    snap = load_snapshot(r.snapshot_uri)
    assert snap.train.nnz == snap.manifest["counts"]["train_interactions"] == r.counts["train_interactions"] > 0
    assert r.digest == manifest_digest(snap.manifest)  # what training tags its versions with
    assert BuildResult.model_validate(r.to_xcom()) == r  # travels between Airflow tasks as JSON


def test_too_few_users(spark, events: Path, tmp_path: Path):
    with pytest.raises(DataError, match="cannot hold"):
        config(events, tmp_path, min_user_interactions=10_000).run()
    assert not (tmp_path / "snapshots" / f"as_of={WEEK1}" / "manifest.json").exists()


@pytest.mark.data
def test_real_movielens(spark, shared_data: Path, tmp_path: Path):
    import pandas as pd

    from pipeline.data.ingest import IngestJob

    src = shared_data / "ml-latest-small" / "interactions.parquet"
    ev = IngestJob(format="interactions", src=src, out=str(tmp_path / "ev"), partition=False).run()
    uri = BuildMatrixJob(events=ev.uri, as_of=dt.date(2016, 12, 31), window_days=365 * 30, out=str(tmp_path / "lake"),
                         spark_master="local[2]", shuffle_partitions=2,
                         binarize=Binarize.parse("weight>=4")).run().snapshot_uri
    snap = load_snapshot(uri)
    df = pd.read_parquet(src)
    pos = df[df.rating >= 4].drop_duplicates(["user_id", "item_id"])
    n = pos.groupby("user_id").size()
    kept = n[n >= 5].index
    c = snap.manifest["counts"]
    assert c["active_users"] == len(kept) and not snap.manifest["window"]["partitioned"]
    held = snap.valid.fold_in.nnz + snap.valid.targets.nnz + snap.test.fold_in.nnz + snap.test.targets.nnz
    assert snap.train.nnz + held <= len(pos[pos.user_id.isin(kept)])
    assert snap.train.nnz == pos[pos.user_id.isin(snap.user_ids[snap.train_users])].shape[0]


def test_cli(spark, events: Path, tmp_path: Path, capsys):
    import argparse

    from pipeline.cli.data import register

    p = argparse.ArgumentParser()
    register(p.add_subparsers(dest="command"))
    args = p.parse_args(["build-matrix", "--events", str(events), "--as-of", "2024-01-07", "--window-days", "7",
                         "--out", str(tmp_path), "--spark-master", "local[2]", "--n-valid", "30", "--n-test", "0.1",
                         "--binarize", "weight>=2", "--shuffle-partitions", "2"])
    assert args.func(args) == 0
    assert "published snapshot" in capsys.readouterr().out
    m = read_manifest(str(tmp_path / "snapshots" / "as_of=2024-01-07"))
    assert m["counts"]["valid_users"] == 30 and m["binarize"] == "weight >= 2"


def test_cli_error_exit_code(tmp_path: Path, capsys):
    from pipeline.cli.main import main

    assert main(["ingest", "--format", "msd", "--src", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
