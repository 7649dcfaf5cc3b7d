"""pipeline.io.spark.spark_session: the active session is reused with UTC and the asked shuffle partitions; a new
one (in a child process, under a non-UTC zone) computes in UTC and a local master is bound to loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.io.spark import is_local_master, spark_session


def test_local_masters() -> None:
    assert all(is_local_master(m) for m in ("local", "local[1]", "local[*]", "local[4,2]"))
    assert not any(is_local_master(m) for m in ("yarn", "spark://10.0.0.1:7077", "k8s://https://host", "localhost"))


def test_the_active_session_is_reused_in_utc(spark) -> None:
    before = spark.conf.get("spark.sql.shuffle.partitions")
    spark.conf.set("spark.sql.session.timeZone", "America/New_York")
    try:
        assert spark_session("local[1]", "other-name", shuffle_partitions=3) is spark
        assert spark.conf.get("spark.sql.session.timeZone") == "UTC"
        assert spark.conf.get("spark.sql.shuffle.partitions") == "3"
        assert spark_session("local[1]", "other-name") is spark  # no shuffle_partitions: left as it is
        assert spark.conf.get("spark.sql.shuffle.partitions") == "3"
    finally:
        spark.conf.set("spark.sql.shuffle.partitions", before)
        spark.conf.set("spark.sql.session.timeZone", "UTC")


CHILD = textwrap.dedent("""
    import json
    from pipeline.io.spark import spark_session
    s = spark_session("local[1]", "recsys-factory-test", shuffle_partitions=2, driver_memory="512m")
    conf = s.sparkContext.getConf()
    midnight = s.sql("SELECT unix_timestamp(CAST('2024-05-04 00:00:00' AS TIMESTAMP)) AS t").collect()[0]["t"]
    print(json.dumps({k: s.conf.get(k) for k in ("spark.sql.session.timeZone", "spark.sql.shuffle.partitions")}
                     | {k: conf.get(k) for k in ("spark.driver.host", "spark.driver.bindAddress", "spark.ui.enabled",
                                                 "spark.driver.memory", "spark.app.name")}
                     | {"midnight": midnight}))
    s.stop()
""")


@pytest.mark.slow
def test_a_new_session_computes_in_utc_on_loopback() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("SPARK_LOCAL_IP",)} | {"TZ": "Asia/Kolkata"}
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[3])
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got == {"spark.sql.session.timeZone": "UTC", "spark.sql.shuffle.partitions": "2",
                   "spark.driver.host": "127.0.0.1", "spark.driver.bindAddress": "127.0.0.1", "spark.ui.enabled": "false",
                   "spark.driver.memory": "512m", "spark.app.name": "recsys-factory-test",
                   "midnight": 1714780800}  # 2024-05-04T00:00:00Z, although the JVM's default zone is Kolkata
