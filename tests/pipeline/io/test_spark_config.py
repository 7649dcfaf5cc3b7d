"""pipeline.io.spark.SparkConfig: master URLs are checked, loopback is only a local master's default, settings come
from configuration (fields, RECSYS_SPARK_*), and an unreachable standalone master is one DataError in bounded time."""

from __future__ import annotations

import socket
import time

import pytest
from pydantic import ValidationError

from pipeline.data.build_matrix import BuildMatrixJob
from pipeline.errors import DataError
from pipeline.io.spark import SparkConfig, check_master, executor_env, probe_master, spark_session

GOOD = ["local", "local[1]", "local[*]", "local[4,2]", "spark://127.0.0.1:7077", "spark://m1:7077,m2.example.com:7077",
        "yarn", "k8s://https://10.0.0.1:6443", "k8s://api.cluster:443", "sc://connect.example.com:15002",
        "sc://localhost/;token=abc"]
BAD = ["", "localhost", "local[]", "local[x]", "spark://host", "spark://:7077", "spark://h:7077/extra", "yarn-cluster",
       "mesos://h:5050", "http://h:7077", "k8s://", "spark://h:7077 ; rm -rf /"]


@pytest.mark.parametrize("master", GOOD)
def test_master_urls_accepted(master: str) -> None:
    assert check_master(master) == master and SparkConfig(master=master).master == master


@pytest.mark.parametrize("master", BAD)
def test_other_masters_are_one_line_errors(master: str) -> None:
    with pytest.raises(DataError, match=r"is not a master URL\. Fix: use local, local\[N\].*spark://HOST:PORT, yarn") as e:
        check_master(master)
    assert "\n" not in str(e.value)
    with pytest.raises(ValidationError, match="is not a master URL"):
        SparkConfig(master=master)


def test_field_validation() -> None:
    for bad in ({"executor_memory": "lots"}, {"driver_memory": "4 GB"}, {"executor_cores": 0},
                {"executor_instances": -1}, {"driver_host": "evil host"}, {"conf": {"fs.s3a.secret.key": "x"}},
                {"connect_timeout_s": 0}, {"nope": 1}):
        with pytest.raises(ValidationError):
            SparkConfig(**bad)  # type: ignore[arg-type]


def test_loopback_only_for_local_masters_and_settings_from_config() -> None:
    local = SparkConfig(master="local[2]").settings()
    assert local["spark.driver.host"] == local["spark.driver.bindAddress"] == "127.0.0.1"
    cluster = SparkConfig(master="spark://10.0.0.5:7077").settings()
    assert "spark.driver.host" not in cluster and "spark.driver.bindAddress" not in cluster  # Spark's own choice
    cfg = SparkConfig(master="yarn", driver_host="10.0.0.9", bind_address="0.0.0.0", executor_cores=4,
                      executor_memory="8g", executor_instances=3, conf={"spark.executor.memory": "9g", "spark.x": "y"})
    got = cfg.settings()
    assert (got["spark.driver.host"], got["spark.driver.bindAddress"], got["spark.executor.cores"],
            got["spark.executor.instances"]) == ("10.0.0.9", "0.0.0.0", "4", "3")
    assert got["spark.executor.memory"] == "9g" and got["spark.x"] == "y"  # conf wins over the typed fields
    assert got["spark.sql.session.timeZone"] == "UTC"
    assert "9g" not in repr(cfg)  # conf may hold secrets: kept out of reprs


def test_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("RECSYS_SPARK_MASTER", "RECSYS_SPARK_DRIVER_HOST", "RECSYS_SPARK_CONF", "RECSYS_SPARK_EXECUTOR_CORES"):
        monkeypatch.delenv(k, raising=False)
    assert SparkConfig.from_env("local[3]") == SparkConfig(master="local[3]")
    monkeypatch.setenv("RECSYS_SPARK_MASTER", "spark://10.1.2.3:7077")
    monkeypatch.setenv("RECSYS_SPARK_DRIVER_HOST", "10.1.2.4")
    monkeypatch.setenv("RECSYS_SPARK_EXECUTOR_CORES", "2")
    monkeypatch.setenv("RECSYS_SPARK_CONF", '{"spark.network.timeout": "30s"}')
    cfg = SparkConfig.from_env()
    assert (cfg.master, cfg.driver_host, cfg.executor_cores, cfg.conf) == ("spark://10.1.2.3:7077", "10.1.2.4", 2,
                                                                          {"spark.network.timeout": "30s"})
    monkeypatch.setenv("RECSYS_SPARK_CONF", "{not json")
    with pytest.raises(DataError, match="RECSYS_SPARK_CONF is not JSON"):
        SparkConfig.from_env()
    monkeypatch.setenv("RECSYS_SPARK_CONF", "{}")
    monkeypatch.setenv("RECSYS_SPARK_EXECUTOR_CORES", "many")
    with pytest.raises(DataError, match="RECSYS_SPARK_EXECUTOR_CORES"):
        SparkConfig.from_env()
    monkeypatch.setenv("RECSYS_SPARK_EXECUTOR_CORES", "2")
    monkeypatch.setenv("RECSYS_SPARK_MASTER", "spark//x")
    with pytest.raises(DataError, match="Spark master 'spark//x' is not a master URL"):
        SparkConfig.from_env()


def test_an_unreachable_master_fails_fast_naming_it() -> None:
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(DataError, match=rf"Spark master spark://127\.0\.0\.1:{port} is unreachable .*Fix: start the "
                                        r"cluster's master") as e:
        probe_master(SparkConfig(master=f"spark://127.0.0.1:{port}", connect_timeout_s=2))
    assert time.monotonic() - t0 < 5 and "\n" not in str(e.value)
    # an address that drops packets: bounded by connect_timeout_s (TEST-NET-1, never routed)
    t0 = time.monotonic()
    with pytest.raises(DataError, match="is unreachable"):
        probe_master(SparkConfig(master="spark://192.0.2.1:7077", connect_timeout_s=1))
    assert time.monotonic() - t0 < 4


def test_a_cluster_is_not_silently_replaced_by_the_active_local_session(spark) -> None:
    with socket.socket() as listening:  # reachable (the probe passes), but this process runs local[2] already
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        with pytest.raises(DataError, match=r"already runs a Spark session on local\[2\], so the job cannot run on "
                                            rf"spark://127\.0\.0\.1:{port}"):
            spark_session(SparkConfig(master=f"spark://127.0.0.1:{port}"), "x")
    assert spark_session("local[1]", "x") is spark  # a local ask reuses it (tests, notebooks)


def test_s3_settings_are_shipped_only_to_a_local_masters_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("RECSYS_UNRELATED", "x")
    assert executor_env("local[2]")["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9"
    assert "RECSYS_UNRELATED" not in executor_env("local[2]")
    assert executor_env("spark://10.0.0.1:7077") == {}  # a cluster's executors use their own environment / role


def test_build_job_takes_a_spark_config_or_a_master() -> None:
    base = {"events": "/e", "as_of": "2024-01-07", "out": "/o"}
    a = BuildMatrixJob(**base, spark_master="local[2]")  # type: ignore[arg-type]
    assert a.spark == SparkConfig(master="local[2]") and a.spark_master == "local[2]"
    b = BuildMatrixJob(**base, spark=SparkConfig(master="spark://10.0.0.1:7077", executor_cores=2))  # type: ignore[arg-type]
    assert b.spark_master == "spark://10.0.0.1:7077" and b.spark.executor_cores == 2
    c = BuildMatrixJob(**base, spark=SparkConfig(executor_cores=2), spark_master="yarn")  # type: ignore[arg-type]
    assert c.spark.master == "yarn" and c.spark.executor_cores == 2
    assert BuildMatrixJob.model_validate(c.model_dump(mode="json")) == c  # round-trips (XCom)
    with pytest.raises(ValidationError, match="is not a master URL"):
        BuildMatrixJob(**base, spark_master="spark:/x")  # type: ignore[arg-type]
