"""Shared fixtures: where the real data sets live (../shared/data by default, RECSYS_DATA_DIR to move it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytest_plugins = ["spark_cluster"]  # tests/spark_cluster.py: the standalone cluster fixture


def data_dir() -> Path:
    return Path(os.environ.get("RECSYS_DATA_DIR", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = data_dir()
    if not (d / "ml-latest-small" / "interactions.parquet").exists():
        pytest.skip(f"real data sets not found under {d} (set RECSYS_DATA_DIR)")
    return d


# -- real services on 127.0.0.1, started once per session and only when a test asks for them -------------

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def moto_server():
    """A moto S3 (and IAM, CloudFormation, SageMaker...) server on 127.0.0.1; never real AWS.

    Yields the endpoint URL. Dummy credentials and the endpoint are put in the environment for the whole
    session (boto3, pyarrow.fs via pipeline.io.lake, and MLflow's S3 artifact client all read them).
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint,
           "MLFLOW_S3_ENDPOINT_URL": endpoint,
           # the shared local server answers slowly while Spark and training load 2 cores: a 3 s stall must not
           # count as "endpoint down" (and mark it down for every later test); test_lake sets its own values
           "RECSYS_S3_REQUEST_TIMEOUT": "30", "RECSYS_S3_RETRY_AFTER": "1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(moto_server: str):
    """A fresh, empty bucket on the moto server: yields its s3:// URI."""
    import uuid

    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def spark():
    """A real Spark session, local[2], bound to 127.0.0.1."""
    import sys

    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    import logging

    from pyspark.sql import SparkSession

    # py4j logs its connection closes at INFO from __del__ at interpreter exit, after pytest closed the streams
    logging.getLogger("py4j").setLevel(logging.WARNING)
    session = (SparkSession.builder.master("local[2]").appName("recsys-tests")
               .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
               .config("spark.ui.enabled", "false").config("spark.sql.shuffle.partitions", "4")
               .getOrCreate())
    yield session
    session.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory, moto_server: str):
    """A real `mlflow server` on 127.0.0.1: SQLite backend, artifacts in a moto S3 bucket. Yields its URL."""
    import subprocess
    import sys
    import time
    import urllib.request

    import boto3

    boto3.client("s3", endpoint_url=moto_server).create_bucket(Bucket="mlflow-artifacts")
    home = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    mlflow_bin = str(Path(sys.executable).with_name("mlflow"))
    proc = subprocess.Popen(
        [mlflow_bin, "server", "--backend-store-uri", f"sqlite:///{home}/mlflow.db",
         "--artifacts-destination", "s3://mlflow-artifacts/", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=open(home / "server.log", "w"), stderr=subprocess.STDOUT, env=env)  # noqa: SIM115
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"mlflow server did not start: {(home / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
