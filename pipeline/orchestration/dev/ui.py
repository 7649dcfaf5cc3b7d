"""`make ui`: the MLflow UI and the Airflow UI on 127.0.0.1 against RECSYS_HOME's stores, until Ctrl-C.

    python -m pipeline.orchestration.dev.ui [--home DIR] [--mlflow-port 5000] [--airflow-port 8080]

MLflow: `mlflow server` on the settings' tracking store (the SQLite file under RECSYS_HOME unless
MLFLOW_TRACKING_URI points elsewhere; a remote http(s) server is only printed, not started). Airflow: its
api-server (the UI and REST API) on the same SQLite DB and home as `make run` / `make backfill`
(pipeline/orchestration/dev/local_airflow.py: same keys, same simple-auth admin), without a scheduler: the UI
shows the runs those commands made. The login is printed to the terminal only (never to a file or a non-terminal
stdout, which may be a persisted CI log): the password lives in its 0600 file under the Airflow home.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from pipeline.orchestration.dev.local_airflow import ADMIN, PASSWORDS_FILE, airflow_env, free_port
from pipeline.orchestration.settings import Settings

DEFAULT_MLFLOW_PORT = 5000
DEFAULT_AIRFLOW_PORT = 8080


class UIError(RuntimeError):
    """A UI server did not start (its log's end is in the message)."""


def port_or_free(port: int) -> int:
    """`port` when nothing listens on it on 127.0.0.1, else a free one (0: any free one)."""
    if port:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                pass
    return free_port()


def answers(url: str, timeout: float = 2.0) -> int | None:
    """The HTTP status `url` answers with (redirects not followed), or None while nothing answers."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: object, **kwargs: object) -> None:
            return None

    try:
        with urllib.request.build_opener(NoRedirect).open(url, timeout=timeout) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:  # 3xx (not followed), 401, ...: it answers
        return int(e.code)
    except (OSError, ValueError):
        return None


class UI:
    """`mlflow server` and `airflow api-server` as subprocesses on 127.0.0.1; stopped on exit (and on Ctrl-C)."""

    def __init__(self, home: Path | str, mlflow_port: int = DEFAULT_MLFLOW_PORT, airflow_port: int = DEFAULT_AIRFLOW_PORT,
                 *, start_timeout: float = 180, env: Mapping[str, str] | None = None) -> None:
        self.home = Path(home).expanduser().resolve()
        self.settings = Settings(home=self.home)
        self.logs = self.home / "logs"
        self.start_timeout = start_timeout
        self.tracking = self.settings.tracking_uri
        self.remote_mlflow = self.tracking.startswith(("http://", "https://"))
        self.mlflow_port = 0 if self.remote_mlflow else port_or_free(mlflow_port)
        self.airflow_port = port_or_free(airflow_port)
        self.mlflow_url = self.tracking if self.remote_mlflow else f"http://127.0.0.1:{self.mlflow_port}"
        self.airflow_env = airflow_env(self.home / "airflow", port=self.airflow_port, extra=env)
        self.airflow_home = Path(self.airflow_env["AIRFLOW_HOME"])
        self.airflow_url = self.airflow_env["AIRFLOW__API__BASE_URL"]
        self.password_file = self.airflow_home / PASSWORDS_FILE
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def _spawn(self, name: str, cmd: list[str], env: Mapping[str, str], cwd: Path) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"ui-{name}.log", "ab") as log:
            # own session: Ctrl-C reaches only us, and stop() takes the whole group (gunicorn/uvicorn workers)
            self.procs[name] = subprocess.Popen(cmd, env=dict(env), cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, start_new_session=True)

    def log_tail(self, name: str, chars: int = 2000) -> str:
        path = self.logs / f"ui-{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def check_alive(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise UIError(f"{name} exited with {p.returncode}; end of {self.logs / f'ui-{name}.log'}:\n"
                              f"{self.log_tail(name)}")

    def __enter__(self) -> UI:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        bin_dir = Path(sys.executable).parent
        if not self.remote_mlflow:
            env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
            env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no background job runners for a read-mostly UI
            self._spawn("mlflow", [str(bin_dir / "mlflow"), "server", "--backend-store-uri", self.tracking,
                                   "--host", "127.0.0.1", "--port", str(self.mlflow_port), "--workers", "1"],
                        env, self.home)
        airflow = str(bin_dir / "airflow")
        migrate = subprocess.run([airflow, "db", "migrate"], env=self.airflow_env, cwd=self.airflow_home,
                                 capture_output=True, text=True, check=False)  # a no-op on an up-to-date DB
        if migrate.returncode != 0:
            raise UIError(f"`airflow db migrate` failed ({migrate.returncode}): {(migrate.stderr or migrate.stdout)[-2000:]}")
        self._spawn("airflow", [airflow, "api-server"], self.airflow_env, self.airflow_home)
        deadline = time.monotonic() + self.start_timeout
        waiting = {"airflow": f"{self.airflow_url}/api/v2/monitor/health"}
        if not self.remote_mlflow:
            waiting["mlflow"] = f"{self.mlflow_url}/health"
        while waiting:
            self.check_alive()
            for name, url in list(waiting.items()):
                if answers(url) == 200:
                    del waiting[name]
            if waiting and time.monotonic() > deadline:
                raise UIError(f"{', '.join(waiting)} not answering after {self.start_timeout:.0f} s (logs in {self.logs})")
            if waiting:
                time.sleep(0.5)

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM each server's process group, then SIGKILL what is left after `timeout`."""
        for p in self.procs.values():
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)  # workers left in its group
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
        self.procs.clear()

    def banner(self, out: IO[str], show_password: bool) -> list[str]:
        """What a person needs: both URLs and the Airflow login (the password itself only when `show_password`)."""
        login = f"user {ADMIN}, password in {self.password_file}"
        if show_password:
            with contextlib.suppress(OSError, ValueError, KeyError):
                login = f"user {ADMIN}, password {json.loads(self.password_file.read_text())[ADMIN]}  (from {self.password_file})"
        lines = [f"MLflow UI   {self.mlflow_url}" + ("  (remote: MLFLOW_TRACKING_URI, not started here)" if self.remote_mlflow
                                                    else f"  (store {self.settings.tracking_uri})"),
                 f"Airflow UI  {self.airflow_url}  (no scheduler: the runs of make run / make backfill)",
                 f"  login     {login}",
                 f"  logs      {self.logs}/ui-*.log",
                 "Ctrl-C stops both."]
        for line in lines:
            print(line, file=out, flush=True)
        return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.orchestration.dev.ui", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--home", type=Path, default=Path(os.environ.get("RECSYS_HOME") or Path.home() / ".recsys"),
                   help="RECSYS_HOME whose stores to show")
    p.add_argument("--mlflow-port", type=int, default=DEFAULT_MLFLOW_PORT, help="MLflow UI port (a free one if taken)")
    p.add_argument("--airflow-port", type=int, default=DEFAULT_AIRFLOW_PORT, help="Airflow UI port (a free one if taken)")
    a = p.parse_args(argv)
    ui = UI(a.home, a.mlflow_port, a.airflow_port)
    print(f"starting the UIs for {ui.home} ...", flush=True)

    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)  # `kill` stops both too, like Ctrl-C
    try:
        with ui:
            ui.banner(sys.stdout, show_password=sys.stdout.isatty())
            while True:
                ui.check_alive()
                time.sleep(1)
    except UIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopped both UIs", flush=True)
        return 0


if __name__ == "__main__":
    sys.exit(main())
