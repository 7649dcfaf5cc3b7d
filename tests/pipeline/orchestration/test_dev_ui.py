"""pipeline.orchestration.dev.ui (`make ui`): the real `mlflow server` and `airflow api-server` on free 127.0.0.1
ports against a fresh RECSYS_HOME; both answer HTTP, the printed login works, and stopping leaves nothing running."""

from __future__ import annotations

import io
import json
import socket
import urllib.request
from pathlib import Path

import psutil
import pytest

from pipeline.orchestration.dev import ui as ui_mod
from pipeline.orchestration.dev.local_airflow import ADMIN, free_port
from pipeline.orchestration.dev.ui import UI, answers, port_or_free


def test_a_taken_port_is_replaced_by_a_free_one() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        other = port_or_free(taken)
        assert other != taken and port_or_free(other) == other


def test_both_uis_answer_and_stop_cleanly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    home = tmp_path / "home"
    u = UI(home, free_port(), free_port(), start_timeout=150)
    with u:
        assert u.mlflow_url.startswith("http://127.0.0.1:") and u.airflow_url.startswith("http://127.0.0.1:")
        assert answers(f"{u.mlflow_url}/") == 200
        assert answers(f"{u.mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1") == 200
        assert answers(f"{u.airflow_url}/") in (200, 302, 307)
        assert answers(f"{u.airflow_url}/api/v2/dags") in (401, 403)  # never anonymous
        # the login the banner names works: a token for the admin, then an authenticated API call
        password = json.loads(u.password_file.read_text())[ADMIN]
        req = urllib.request.Request(f"{u.airflow_url}/auth/token", method="POST",
                                     data=json.dumps({"username": ADMIN, "password": password}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            token = json.loads(r.read())["access_token"]
        authed = urllib.request.Request(f"{u.airflow_url}/api/v2/dags", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(authed, timeout=10) as r:
            assert r.status == 200
        # the password reaches a terminal only
        quiet, loud = io.StringIO(), io.StringIO()
        u.banner(quiet, show_password=False)
        u.banner(loud, show_password=True)
        assert password not in quiet.getvalue() and str(u.password_file) in quiet.getvalue()
        assert password in loud.getvalue()
        assert u.mlflow_url in quiet.getvalue() and u.airflow_url in quiet.getvalue()
        assert (home / "mlflow.db").exists()  # the settings' store under RECSYS_HOME
        pids = [p.pid for p in u.procs.values()]
        children = [c.pid for pid in pids for c in psutil.Process(pid).children(recursive=True)]
    assert not u.procs
    assert answers(f"{u.mlflow_url}/health", timeout=1) is None and answers(f"{u.airflow_url}/", timeout=1) is None
    alive = [p for p in pids + children if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, alive
    # nothing secret in the servers' logs
    logs = "".join(f.read_text(errors="replace") for f in (home / "logs").glob("ui-*.log"))
    assert password not in logs


def test_a_server_that_dies_is_reported_with_its_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # remote: MLflow is not started here
    u = UI(tmp_path / "home", free_port(), free_port())
    assert u.remote_mlflow and u.mlflow_url == "http://127.0.0.1:9"
    u._spawn("airflow", [ui_mod.sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], u.airflow_env, tmp_path)
    u.procs["airflow"].wait(10)
    with pytest.raises(ui_mod.UIError, match=r"airflow exited with 3; end of .*ui-airflow.log:\nboom"):
        u.check_alive()
    u.stop()
