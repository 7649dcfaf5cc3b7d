"""The weekly build on a real Spark standalone cluster (tests/spark_cluster.py: a master and 2 workers on 127.0.0.1)
gives the same snapshot content as local[2]: the same files, byte for byte, so the same content digest, with the
train/heldout parts written by the executors. Faults: an unreachable master is one line in seconds and publishes
nothing; a worker SIGKILLed while the executors write parts does not change the result (Spark reruns its tasks on
the other workers, and a part's bytes depend only on its rows)."""

from __future__ import annotations

import datetime as dt
import json
import socket
import time
from pathlib import Path

import pytest

from pipeline.cli.main import main
from pipeline.data.build_matrix import BuildMatrixJob
from pipeline.data.synth_events import SynthEventsJob
from pipeline.errors import DataError
from pipeline.io.snapshot import content_digest, load_snapshot, read_manifest

AS_OF = dt.date(2024, 1, 7)
PART_ROWS = 2500  # small blocks: several train and heldout parts, written by several tasks

pytestmark = pytest.mark.slow

DRIVER = """
import json, sys
from pipeline.data.build_matrix import BuildMatrixJob
from pipeline.io.snapshot import read_manifest
job = BuildMatrixJob.model_validate(json.loads(sys.argv[1]))
r = job.run()
print("RESULT " + json.dumps({"result": r.model_dump(mode="json"), "files": read_manifest(r.snapshot_uri)["files"]}))
"""


def job_fields(events: Path, out: Path, spark: dict) -> dict:
    return {"events": str(events), "as_of": AS_OF.isoformat(), "out": str(out), "window_days": 7, "seed": 7,
            "shuffle_partitions": 4, "part_rows": PART_ROWS, "spark": spark}


def on_cluster(cluster, fields: dict, timeout: float = 300) -> dict:
    import subprocess
    import sys

    from spark_cluster import REPO, cluster_env

    done = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(fields)], cwd=REPO, env=cluster_env(),
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def tables_of(files: dict) -> dict[str, str]:
    return {rel.split("/", 1)[1]: e["sha256"] for rel, e in files.items()}


@pytest.fixture(scope="module")
def events(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cluster-events") / "events"
    SynthEventsJob(users=1500, items=400, days=14, out=str(root), seed=11).run()
    return root


@pytest.fixture(scope="module")
def local_build(spark, events: Path, tmp_path_factory) -> dict:
    """The embedded profile's build (local[2], in this process): the reference."""
    out = tmp_path_factory.mktemp("local-lake")
    r = BuildMatrixJob.model_validate(job_fields(events, out, {"master": "local[2]"})).run()
    return {"result": r.model_dump(mode="json"), "files": read_manifest(r.snapshot_uri)["files"]}


def test_cluster_build_has_the_local_builds_content(spark_cluster, local_build: dict, events: Path, tmp_path: Path):
    got = on_cluster(spark_cluster, job_fields(events, tmp_path / "lake", spark_cluster.spark_config()))
    want = local_build
    assert tables_of(got["files"]) == tables_of(want["files"])  # every file byte-identical
    assert got["result"]["content_digest"] == want["result"]["content_digest"] != ""
    assert got["result"]["counts"] == want["result"]["counts"]
    assert got["result"]["digest"] != want["result"]["digest"]  # the manifest's: another run and another master
    names = tables_of(got["files"])
    assert sum(n.startswith("train/") for n in names) >= 3 and sum(n.startswith("heldout/") for n in names) >= 2
    snap = load_snapshot(got["result"]["snapshot_uri"])  # what training reads: checksums verified
    assert snap.train.nnz == got["result"]["counts"]["train_interactions"]
    assert content_digest(snap.manifest) == want["result"]["content_digest"]
    assert read_manifest(got["result"]["snapshot_uri"])["config"]["spark_master"] == spark_cluster.master_url
    # the executors of both workers ran tasks of this application (their work dirs hold its executor folders)
    assert all(any((spark_cluster.home / f"worker-{k}").glob("app-*/*/stderr")) for k in range(2))


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_master_is_one_line_and_publishes_nothing(events: Path, tmp_path: Path, capsys):
    port = _dead_port()
    fields = job_fields(events, tmp_path / "lake", {"master": f"spark://127.0.0.1:{port}", "connect_timeout_s": 2})
    t0 = time.monotonic()
    with pytest.raises(DataError, match=rf"Spark master spark://127\.0\.0\.1:{port} is unreachable .*Fix: start the "
                                        "cluster's master"):
        BuildMatrixJob.model_validate(fields).run()
    assert time.monotonic() - t0 < 20
    assert not (tmp_path / "lake" / "snapshots").exists()
    code = main(["build-matrix", "--events", str(events), "--as-of", AS_OF.isoformat(), "--window-days", "7",
                 "--out", str(tmp_path / "lake"), "--spark-master", f"spark://127.0.0.1:{port}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and f"spark://127.0.0.1:{port} is unreachable" in err
    assert not (tmp_path / "lake" / "snapshots").exists()


def test_a_worker_killed_mid_build_changes_nothing(spark_cluster, local_build: dict, events: Path, tmp_path: Path):
    """A third worker joins, the build starts with executors on all three, and once executors are writing parts
    (a hook makes every part write announce itself and pause 2 s) the third worker and its executor are SIGKILLed.
    Spark reruns the lost tasks (and the shuffle output they lost) on the other two: the build succeeds with the
    local build's content. The cluster is back to its two workers for later tests."""
    import subprocess
    import sys

    from spark_cluster import REPO, cluster_env

    victim = spark_cluster.add_worker()
    spark_cluster.wait_alive(3)
    marker = tmp_path / "part-written"
    conf = {"spark.network.timeout": "60s", "spark.executor.heartbeatInterval": "5s", "spark.task.maxFailures": "4",
            "spark.executorEnv.RECSYS_HOOK_POINT": "snapshot-part", "spark.executorEnv.RECSYS_HOOK_FILE": str(marker),
            "spark.executorEnv.RECSYS_HOOK_SLEEP": "2"}
    fields = job_fields(events, tmp_path / "lake", spark_cluster.spark_config(conf=conf))
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(fields)], cwd=REPO, env=cluster_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not marker.exists():
            assert proc.poll() is None, f"the build ended before writing a part: {proc.communicate()[1][-3000:]}"
            assert time.time() < deadline, "no part was written within 240 s"
            time.sleep(0.1)
        assert proc.poll() is None
        spark_cluster.kill_worker(victim)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-4000:]
    got = json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[len("RESULT "):])
    assert tables_of(got["files"]) == tables_of(local_build["files"])
    assert got["result"]["content_digest"] == local_build["result"]["content_digest"]
    assert "lost" in err.lower() or "killed" in err.lower() or "dead" in err.lower()  # Spark saw the executor go
    assert spark_cluster.alive_workers() >= 2


def test_s3_events_on_a_cluster_need_read_direct(spark, events: Path, s3_bucket: str, tmp_path: Path):
    """The driver's staging folder is not the executors' disk: on a cluster master, S3 events without read_direct are
    refused before Spark starts; with read_direct the footers are read from S3 and Spark reads s3a:// itself (here
    local[2] has no hadoop-aws jars: one line saying so, nothing published)."""
    from pipeline.io.lake import resolve

    for day in sorted(p.name for p in events.iterdir() if p.name.startswith("dt=")):
        for f in (events / day).glob("*.parquet"):
            resolve(f"{s3_bucket}/ev/{day}/{f.name}").write_bytes(f.read_bytes())
    fields = job_fields(Path(f"{s3_bucket}/ev"), tmp_path / "lake", {"master": "spark://127.0.0.1:7077"})
    fields["events"] = f"{s3_bucket}/ev"
    with pytest.raises(DataError, match=r"would be staged to the driver's disk, which the executors of "
                                        r"spark://127\.0\.0\.1:7077 cannot read\. Fix: set read_direct"):
        BuildMatrixJob.model_validate(fields).run()
    with pytest.raises(DataError, match=r"cannot read s3a:// \(no hadoop-aws on its classpath\)"):
        BuildMatrixJob.model_validate({**fields, "spark": {"master": "local[2]"}, "read_direct": True}).run()
    assert not (tmp_path / "lake" / "snapshots").exists()
