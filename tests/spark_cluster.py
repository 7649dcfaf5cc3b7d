"""pytest plugin: a real Spark standalone cluster on 127.0.0.1 (a master and two workers, one core each).

Started from the pyspark package's own `spark-class` (org.apache.spark.deploy.master.Master / ...worker.Worker),
on free ports, web UIs bound to loopback (SPARK_LOCAL_IP), work and log folders under the session's tmp. The
master's RPC and UI addresses are read from its own log once it says its UI is bound. Spark starts the UI's Jetty
server before attaching its pages, so a poll in between gets a 404 or, once "/" is attached but "/json" is not,
the master's HTML page (a CI run failed on exactly that); and a port taken in between makes Spark bind the next
one. Ready when our master's JSON page lists 2 ALIVE workers; stopped (and waited for) at the end of the session.

This test process already runs a local[2] session (the `spark` fixture) and a process has one SparkContext, so
jobs run on the cluster in a child process: `run_on_cluster(code)` runs a Python snippet with the cluster's
environment and returns its completed process. The executors run this venv's Python (PYSPARK_PYTHON), so they
import `pipeline` like the driver does.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
WORKERS = 2
START_TIMEOUT_S = 120


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spark_class() -> Path:
    import pyspark

    return Path(pyspark.__file__).parent / "bin" / "spark-class"


def cluster_env() -> dict[str, str]:
    """The environment of the cluster's daemons and of a driver that uses the cluster."""
    import pyspark

    return {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable,
            "PYSPARK_DRIVER_PYTHON": sys.executable, "SPARK_HOME": str(Path(pyspark.__file__).parent),
            "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
            "SPARK_NO_DAEMONIZE": "1"}  # spark-class runs in the foreground anyway; kept for clarity


@dataclass
class Worker:
    proc: subprocess.Popen
    log: Path


@dataclass
class StandaloneCluster:
    master_url: str  # spark://127.0.0.1:PORT
    ui_url: str  # http://127.0.0.1:PORT (the master's JSON at /json/)
    home: Path
    master: subprocess.Popen
    workers: list[Worker] = field(default_factory=list)
    worker_memory: str = "1g"

    def state(self) -> dict:
        """Our master's JSON state; a RuntimeError when the UI address answers with anything else."""
        with urllib.request.urlopen(f"{self.ui_url}/json/", timeout=5) as r:
            body = r.read()
        try:
            state = json.loads(body)
        except ValueError:
            state = None
        if not isinstance(state, dict) or state.get("url") != self.master_url:
            raise RuntimeError(f"{self.ui_url}/json/ is not the JSON page of the master {self.master_url}: "
                               f"{body[:200]!r}")
        return state

    def alive_workers(self) -> int:
        return sum(1 for w in self.state().get("workers", []) if w.get("state") == "ALIVE")

    def logs(self) -> str:
        parts = []
        for p in sorted(self.home.glob("*.log")):
            parts.append(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}")
        return "\n".join(parts)

    def spark_config(self, **kw: object) -> dict:
        """SparkConfig fields for a driver on this machine using the cluster (as a dict: JSON for a child)."""
        return {"master": self.master_url, "driver_host": "127.0.0.1", "bind_address": "127.0.0.1",
                "executor_cores": 1, "executor_memory": "640m", "driver_memory": "1g",
                "conf": {"spark.network.timeout": "60s", "spark.executor.heartbeatInterval": "5s",
                         "spark.task.maxFailures": "4"}, **kw}

    def run(self, code: str, timeout: float = 240, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run a Python snippet as a driver of this cluster (its own process and SparkContext)."""
        return subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**cluster_env(), **(env or {})},
                              capture_output=True, text=True, timeout=timeout)

    def add_worker(self) -> Worker:
        work = self.home / f"worker-{len(self.workers)}"
        work.mkdir(exist_ok=True)
        log = self.home / f"worker-{len(self.workers)}.log"
        proc = subprocess.Popen(
            [str(_spark_class()), "org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1",
             "--port", str(_free_port()), "--webui-port", str(_free_port()), "--cores", "1", "--memory", self.worker_memory,
             "--work-dir", str(work), self.master_url],
            env=cluster_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
            start_new_session=True)  # its own group: stopping it also stops the executors it launched
        w = Worker(proc, log)
        self.workers.append(w)
        return w

    def wait_alive(self, n: int, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.time() + timeout
        got = -1
        while time.time() < deadline:
            if self.master.poll() is not None:
                break
            try:
                got = self.alive_workers()
                if got >= n:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the Spark standalone cluster on {self.master_url} did not get {n} ALIVE workers within "
                           f"{timeout:.0f} s (had {got}); logs:\n{self.logs()}")

    def kill_worker(self, w: Worker) -> None:
        """SIGKILL a worker and the executors it launched (its process group), as a lost machine would."""
        os.killpg(w.proc.pid, signal.SIGKILL)
        w.proc.wait(30)


_MASTER_URL = re.compile(r"Starting Spark master at (spark://\S+)")
_MASTER_UI = re.compile(r"Bound MasterWebUI to \S+ and started at http://[^:/\s]+:(\d+)")


def _master_addresses(log: Path, proc: subprocess.Popen, timeout: float = START_TIMEOUT_S) -> tuple[str, str]:
    """(spark://host:port, http://127.0.0.1:uiport) as the master logs them once bound."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        text = log.read_text(errors="replace") if log.exists() else ""
        url, ui = _MASTER_URL.search(text), _MASTER_UI.search(text)
        if url and ui:
            return url.group(1), f"http://127.0.0.1:{ui.group(1)}"
        time.sleep(0.25)
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"
    raise RuntimeError(f"the Spark master did not log its addresses within {timeout:.0f} s "
                       f"(exit code {proc.poll()}); its log:\n{tail}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@contextlib.contextmanager
def standalone(home: Path, workers: int = WORKERS, worker_memory: str = "1g") -> Iterator[StandaloneCluster]:
    """A master and `workers` workers (1 core, `worker_memory` each) on 127.0.0.1, logs and work dirs under `home`;
    stopped and waited for on exit (bench/build_matrix.py uses it too)."""
    log = home / "master.log"
    master = subprocess.Popen(
        [str(_spark_class()), "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
         "--port", str(_free_port()), "--webui-port", str(_free_port())],
        env=cluster_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
        start_new_session=True)
    cluster: StandaloneCluster | None = None
    try:
        master_url, ui_url = _master_addresses(log, master)
        cluster = StandaloneCluster(master_url, ui_url, home, master, worker_memory=worker_memory)
        for _ in range(workers):
            cluster.add_worker()
        cluster.wait_alive(workers)
        yield cluster
    finally:
        for w in cluster.workers if cluster else []:
            _stop(w.proc)
        _stop(master)


@pytest.fixture(scope="session")
def spark_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandaloneCluster]:
    """A Spark standalone master and 2 workers (1 core, 1 GiB each) on 127.0.0.1, for the whole session."""
    with standalone(tmp_path_factory.mktemp("spark-cluster")) as cluster:
        yield cluster
