"""The standalone-cluster plugin (tests/spark_cluster.py) trusts only its own master's log and JSON page.

A CI run once polled the master's UI while Spark was still attaching its pages and read HTML at /json/; these
check that the plugin takes the addresses the master logs (after its UI is bound) and refuses a page that is not
its master's JSON, with a message saying what answered. The HTTP server here stands in for a UI answering with the
wrong page (no Spark needed).
"""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from spark_cluster import StandaloneCluster, _master_addresses

LOG = """26/12/04 19:52:32 INFO Utils: Successfully started service 'sparkMaster' on port 55363.
26/12/04 19:52:32 INFO Master: Starting Spark master at spark://127.0.0.1:55363
26/12/04 19:52:33 WARN Utils: Service 'MasterUI' could not bind on port 41203. Attempting port 41204.
26/12/04 19:52:34 INFO MasterWebUI: Bound MasterWebUI to 127.0.0.1, and started at http://localhost:41204
"""


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_the_addresses_are_the_ones_the_master_logs(tmp_path: Path) -> None:
    (tmp_path / "master.log").write_text(LOG)
    proc = _sleeper()
    try:
        assert _master_addresses(tmp_path / "master.log", proc, timeout=5) == (
            "spark://127.0.0.1:55363", "http://127.0.0.1:41204")
    finally:
        proc.kill()
        proc.wait()


def test_a_master_that_exits_before_logging_them_is_reported_with_its_log(tmp_path: Path) -> None:
    (tmp_path / "master.log").write_text("Error: port in use\n")
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait()
    with pytest.raises(RuntimeError, match=r"(?s)exit code 3.*port in use"):
        _master_addresses(tmp_path / "master.log", proc, timeout=5)


@pytest.fixture
def page() -> Iterator[tuple[str, list[bytes]]]:
    """An HTTP server on 127.0.0.1 answering /json/ with whatever body the test puts in the list."""
    bodies: list[bytes] = [b""]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(bodies[0])

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", bodies
    finally:
        server.shutdown()
        server.server_close()


def _cluster(ui: str, tmp_path: Path) -> StandaloneCluster:
    return StandaloneCluster("spark://127.0.0.1:55363", ui, tmp_path, master=None)  # type: ignore[arg-type]


def test_another_spark_uis_html_is_refused_naming_what_answered(page, tmp_path: Path) -> None:
    ui, bodies = page
    bodies[0] = b'<!DOCTYPE html><html data-bs-theme="light"><footer><span>root</span></footer></html>'
    with pytest.raises(RuntimeError, match=r"not the JSON page of the master spark://127\.0\.0\.1:55363.*DOCTYPE"):
        _cluster(ui, tmp_path).state()


def test_another_masters_json_is_refused(page, tmp_path: Path) -> None:
    ui, bodies = page
    bodies[0] = b'{"url": "spark://127.0.0.1:1", "workers": []}'
    with pytest.raises(RuntimeError, match="not the JSON page"):
        _cluster(ui, tmp_path).state()


def test_our_masters_json_counts_its_alive_workers(page, tmp_path: Path) -> None:
    ui, bodies = page
    bodies[0] = (b'{"url": "spark://127.0.0.1:55363", "workers": [{"state": "ALIVE"}, {"state": "DEAD"}, '
                 b'{"state": "ALIVE"}]}')
    assert _cluster(ui, tmp_path).alive_workers() == 2
