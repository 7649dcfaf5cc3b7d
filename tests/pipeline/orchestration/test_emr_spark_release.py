"""The Spark jobs on the Spark that EMR Serverless runs them on, not only on the pinned pyspark.

The `aws` profile's EMR Serverless application is the compute stack's `EmrReleaseLabel`, emr-spark-8.0.0, which ships
Apache Spark 4.0.2; the project pins pyspark 4.3.0. `make test` builds .venv-emr-spark: pyspark 4.0.2 over the
project's environment. Here the matrix build and the Spark inference engine run the way EMR runs them: that Spark's
`spark-submit` with remote.py as the application and the staged envelope's URI as its argument. Their outputs must
equal what the pinned Spark produces in this process, and the published parts must be readable by Spark 4.0.2 (the
downstream jobs' reader: Spark before 4.1 cannot read BYTE_STREAM_SPLIT). Only the cluster is local[2], not EMR.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from infer_support import events_table, run_infer, tiny_bundle, write_events

from pipeline.data.build_matrix import BuildMatrixJob, BuildResult
from pipeline.data.synth_events import SynthEventsJob
from pipeline.orchestration import remote
from pipeline.serving.job import InferJob, InferResult
from pipeline.serving.recs import read_recommendations

REPO = Path(__file__).resolve().parents[3]
VENV = REPO / ".venv-emr-spark"
EMR_RELEASE_SPARK = {"emr-spark-8.0.0": "4.0.2"}  # the release's Apache Spark (AWS release notes)
DAY = dt.date(2024, 5, 3)
pytestmark = pytest.mark.slow


def _makefile_pin() -> str:
    m = re.search(r"(?m)^EMR_SPARK_VERSION := (\S+)$", (REPO / "Makefile").read_text())
    assert m, "Makefile: EMR_SPARK_VERSION not found"
    return m[1]


class _CfnLoader(yaml.SafeLoader):
    """YAML with CloudFormation's short tags (!Ref, !Sub, ...) read as plain values."""


_CfnLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def test_the_tested_spark_is_the_release_s() -> None:
    template = yaml.load((REPO / "infra" / "compute.yaml").read_text(), Loader=_CfnLoader)  # a SafeLoader
    release = template["Parameters"]["EmrReleaseLabel"]["Default"]
    assert release in EMR_RELEASE_SPARK, f"compute.yaml's EmrReleaseLabel {release}: add its Spark version here"
    assert _makefile_pin() == EMR_RELEASE_SPARK[release]
    docker = (REPO / "docker" / "spark.Dockerfile").read_text()
    assert f"/spark/{release}:" in docker, "docker/spark.Dockerfile must derive from the same release's base image"


@pytest.fixture(scope="module")
def emr_spark() -> Path:
    """.venv-emr-spark's interpreter, after checking it carries the release's pyspark (its own JVM jars)."""
    py = VENV / "bin" / "python"
    if not py.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{VENV.name} is missing: `make test` builds it (make {VENV.name}/.installed-{_makefile_pin()})")
        pytest.skip(f"{VENV.name} is missing: make {VENV.name}/.installed-{_makefile_pin()}")
    found = list((VENV / "lib").glob("python3.*/site-packages/pyspark/version.py"))
    assert len(found) == 1 and f"__version__: str = '{_makefile_pin()}'" in found[0].read_text(), found
    return py


def _submit(emr_spark: Path, app: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`spark-submit app args` with the release's Spark, driver and Python workers on its interpreter."""
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": str(emr_spark),
           "PYSPARK_DRIVER_PYTHON": str(emr_spark), "OMP_NUM_THREADS": "1"}
    env.pop("SPARK_HOME", None)  # the release's pyspark finds its own home
    cmd = [str(VENV / "bin" / "spark-submit"), "--master", "local[2]", "--conf", "spark.driver.host=127.0.0.1",
           "--conf", "spark.driver.bindAddress=127.0.0.1", "--conf", "spark.ui.enabled=false", str(app), *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)


def test_the_matrix_build_on_the_release_s_spark_equals_the_pinned_one(emr_spark: Path, spark, tmp_path: Path) -> None:
    events = tmp_path / "events"
    SynthEventsJob(users=600, items=200, days=14, out=str(events), seed=5).run()
    common = {"events": str(events), "as_of": dt.date(2024, 1, 14), "window_days": 7, "spark_master": "local[2]",
              "shuffle_partitions": 2, "seed": 3}
    here = BuildMatrixJob(out=str(tmp_path / "pinned"), **common).run()  # type: ignore[arg-type]
    uri = remote.stage(BuildMatrixJob(out=str(tmp_path / "emr"), **common),  # type: ignore[arg-type]
                       str(tmp_path / "_jobs" / "build_matrix"))
    done = _submit(emr_spark, remote.ENTRY_POINT, uri)
    assert done.returncode == 0, done.stderr[-4000:]
    there = remote.collect(uri)
    assert isinstance(there, BuildResult)
    assert there.counts == here.counts and there.counts["users"] > 100
    assert there.content_digest == here.content_digest  # the same files, byte for byte


_READ_PARTS = """
import json, sys
from pyspark.sql import SparkSession
spark = SparkSession.builder.getOrCreate()
rows = spark.read.parquet(*sys.argv[2:]).select("user_id", "item_ids", "scores").collect()
with open(sys.argv[1], "w") as f:
    json.dump({"spark": spark.version, "rows": {str(r.user_id): [r.item_ids, r.scores] for r in rows}}, f)
"""


def test_the_spark_engine_on_the_release_s_spark_publishes_the_local_lists_readable_by_it(
        emr_spark: Path, tmp_path: Path) -> None:
    bundle = tiny_bundle()
    model = bundle.save(tmp_path / "bundle")
    events = write_events(events_table(n_users=80, unknown_every=9), str(tmp_path / "events"))
    common = {"date": DAY, "events": events, "device": "cpu", "top_n": 10, "progress": False, "shard_events": 150,
              "history_days": 2}
    local = run_infer(InferJob(out=str(tmp_path / "local"), engine="local", **common), bundle, "3")  # type: ignore[arg-type]
    uri = remote.stage(InferJob(out=str(tmp_path / "emr"), engine="spark", model=str(model), **common),  # type: ignore[arg-type]
                       str(tmp_path / "_jobs" / "infer"))
    done = _submit(emr_spark, remote.ENTRY_POINT, uri)
    assert done.returncode == 0, done.stderr[-4000:]
    result = remote.collect(uri)
    assert isinstance(result, InferResult) and result.users == local["rows"]
    la = {r["user_id"]: r for r in read_recommendations(str(tmp_path / "local"), DAY).to_pylist()}
    lb = {r["user_id"]: r for r in read_recommendations(str(tmp_path / "emr"), DAY).to_pylist()}
    assert la.keys() == lb.keys()
    for u, r in la.items():
        assert r["item_ids"] == lb[u]["item_ids"] and r["fallback"] == lb[u]["fallback"]
        np.testing.assert_allclose(r["scores"], lb[u]["scores"], rtol=1e-5, atol=1e-6)
    # a downstream Spark job on the same release reads the published parts
    parts = sorted(str(p) for p in (tmp_path / "emr" / "recommendations" / f"dt={DAY}").glob("run-*/part-*.parquet"))
    script, out = tmp_path / "read_parts.py", tmp_path / "read.json"
    script.write_text(_READ_PARTS)
    read = _submit(emr_spark, script, str(out), *parts)
    assert read.returncode == 0, read.stderr[-4000:]
    got = json.loads(out.read_text())
    assert got["spark"] == _makefile_pin()
    assert {int(u) for u in got["rows"]} == lb.keys()
    assert all(got["rows"][str(u)] == [lb[u]["item_ids"], lb[u]["scores"]] for u in lb)
