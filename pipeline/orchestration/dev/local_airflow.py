"""Run a date range through a real, local Airflow 3.3 (`make backfill`): scheduler + dag-processor + api-server.

`airflow backfill create` only queues runs; they execute when the three services run and the DAG is unpaused.
This module starts them on 127.0.0.1 against a SQLite DB under RECSYS_HOME/airflow, creates the backfill,
waits for every logical date to finish, prints a per-date table and always stops the services again.

    python -m pipeline.orchestration.dev.local_airflow backfill --dag daily_inference --start 2026-01-01 --end 2026-01-07

Secrets (fernet key, API secret key, JWT secret, the admin password) are generated once into files under the
Airflow home (mode 0600); they are never put in the environment, the command line or a log.

The REST calls go through Airflow's own generated client (`apache-airflow-client`, pinned to the Airflow
version): typed requests and answers instead of hand-built URLs and JSON. It is a dev dependency, like this module.
"""

from __future__ import annotations

import argparse
import ast
import base64
import contextlib
import datetime as dt
import fcntl
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import urllib3
from airflow_client.client import ApiClient, Configuration
from airflow_client.client.api.backfill_api import BackfillApi
from airflow_client.client.api.dag_api import DAGApi
from airflow_client.client.api.dag_run_api import DagRunApi
from airflow_client.client.api.monitor_api import MonitorApi
from airflow_client.client.exceptions import ApiException
from airflow_client.client.models.backfill_post_body import BackfillPostBody
from airflow_client.client.models.backfill_response import BackfillResponse
from airflow_client.client.models.dag_patch_body import DAGPatchBody
from airflow_client.client.models.dag_run_mutable_states import DagRunMutableStates
from airflow_client.client.models.dag_run_patch_body import DAGRunPatchBody
from airflow_client.client.models.dag_run_response import DAGRunResponse
from airflow_client.client.models.dag_run_type import DagRunType
from airflow_client.client.models.health_info_response import HealthInfoResponse
from airflow_client.client.models.reprocess_behavior import ReprocessBehavior

from pipeline.errors import DataError

REPO_DAGS = Path(__file__).resolve().parents[3] / "dags"  # <repo>/pipeline/orchestration/dev/ -> <repo>/dags
ADMIN = "admin"
PASSWORDS_FILE = "simple_auth_manager_passwords.json"
_DAG_ID = re.compile(r"^[A-Za-z0-9_.-]{1,250}$")  # Airflow's own key rule, minus unicode \w
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
TERMINAL = ("success", "failed")
SERVICES = ("api-server", "scheduler", "dag-processor")
REQUEST_TIMEOUT = 60.0  # seconds per REST call (the generated client has no default: a hung api-server would hang us)
HEALTH_TIMEOUT = 5.0


def _airflow_bin() -> str:
    return str(Path(sys.executable).with_name("airflow"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def default_home() -> Path:
    return Path(os.environ.get("RECSYS_HOME", Path.home() / ".recsys")).expanduser().resolve() / "airflow"


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # O_EXCL: never overwrite existing secrets
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _ensure_secrets(home: Path) -> None:
    """A minimal airflow.cfg holding the generated keys, and the admin password file, both 0600.

    The JWT secret must be shared: the scheduler signs task tokens that the api-server's execution API checks,
    and Airflow's fallback (a random secret per process) makes every task fail with 403.
    Pre-creating the simple auth manager's password file stops the api-server printing the password to its log.
    """
    cfg = home / "airflow.cfg"
    if not cfg.exists():
        _write_private(cfg, "\n".join([
            "# Written by pipeline.orchestration.dev.local_airflow; settings come from AIRFLOW__* variables,"
            " only keys live here.",
            "[core]", f"fernet_key = {base64.urlsafe_b64encode(os.urandom(32)).decode()}",
            "[api]", f"secret_key = {secrets.token_urlsafe(32)}",
            "[api_auth]", f"jwt_secret = {secrets.token_urlsafe(48)}", ""]))
    pw = home / PASSWORDS_FILE
    if not pw.exists():
        _write_private(pw, json.dumps({ADMIN: secrets.token_urlsafe(24)}) + "\n")


def airflow_env(home: Path | str | None = None, dags_folder: Path | str | None = None, port: int | None = None,
                extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The full environment for local Airflow processes (creates the home, its keys and password file).

    Inherited AIRFLOW_* / AIRFLOW__* variables are dropped so that a shell set up for another Airflow cannot
    point this one at a foreign DB or config; RECSYS_* and the rest pass through to the tasks.
    """
    home = Path(home).expanduser().resolve() if home else default_home()
    dags = Path(dags_folder).expanduser().resolve() if dags_folder else REPO_DAGS
    port = port or free_port()
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    _ensure_secrets(home)
    base = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    url = f"http://127.0.0.1:{port}"
    env = {
        **base,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW_CONFIG": str(home / "airflow.cfg"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        # 3.3 accepts LocalExecutor on SQLite (SequentialExecutor is gone); a few workers, not 32 forks on 2 cores
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": str(min(4, max(2, os.cpu_count() or 2))),
        "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        # data_interval_start < data_interval_end for cron schedules (weekly_train reads data_interval_end)
        "AIRFLOW__SCHEDULER__CREATE_CRON_DATA_INTERVALS": "True",
        # only backfill (and manual) runs: an unpaused daily_inference (catchup=True) would otherwise queue every
        # day since its start_date, plus each DAG's latest interval, next to the backfill
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
        "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_HOST": "127.0.0.1",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API__BASE_URL": url,
        "AIRFLOW__API__EXPOSE_CONFIG": "False",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{url}/execution/",
        # the log servers bind every interface whatever the config says: the scheduler runs with
        # --skip-serve-logs (logs are local files the api-server reads directly); ports are still made free
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__LOGGING__COLORED_CONSOLE_LOG": "False",
        # simple auth manager: one admin whose password is in the home (never anonymous admin on the port)
        "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / PASSWORDS_FILE),
    }
    env.update(extra or {})
    return env


# -- validation (before anything starts) ------------------------------------------------------------------

def dag_ids_in(folder: Path) -> set[str]:
    """DAG ids declared in a folder's files, read with `ast` (no Airflow import, no DAG code executed)."""
    ids: set[str] = set()
    for f in sorted(folder.rglob("*.py")):
        try:
            tree = ast.parse(f.read_text(), filename=str(f))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", getattr(node.func, "attr", None))
                for kw in node.keywords:
                    if kw.arg == "dag_id" and isinstance(kw.value, ast.Constant) and isinstance(kw.value.value, str):
                        ids.add(kw.value.value)
                if name == "DAG" and node.args and isinstance(node.args[0], ast.Constant):
                    ids.add(str(node.args[0].value))
            if isinstance(node, ast.FunctionDef):
                for d in node.decorator_list:  # @dag / @dag(...) without dag_id: the function's name
                    call = d if isinstance(d, ast.Call) else None
                    fn = call.func if call else d
                    if getattr(fn, "id", getattr(fn, "attr", None)) == "dag" and not (
                            call and any(kw.arg == "dag_id" for kw in call.keywords)):
                        ids.add(node.name)
    return ids


def check_dag_id(dag_id: str, dags_folder: Path) -> str:
    if not _DAG_ID.match(dag_id or ""):
        raise DataError(f"invalid DAG id {dag_id!r}", "use letters, digits, '_', '.' or '-' only")
    known = dag_ids_in(dags_folder)
    if dag_id not in known:
        raise DataError(f"no DAG {dag_id!r} in {dags_folder}", f"use one of: {', '.join(sorted(known)) or '(none found)'}")
    return dag_id


def check_range(start: str, end: str) -> tuple[dt.date, dt.date]:
    dates = []
    for name, value in (("start", start), ("end", end)):
        try:
            if not _DATE.match(value or ""):
                raise ValueError(value)
            dates.append(dt.date.fromisoformat(value))
        except ValueError as e:
            raise DataError(f"invalid {name} date {value!r}", "use a real calendar date as YYYY-MM-DD") from e
    if dates[0] > dates[1]:
        raise DataError(f"start {start} is after end {end}", "give START <= END")
    return dates[0], dates[1]


# -- the services ---------------------------------------------------------------------------------------------

class AirflowError(RuntimeError):
    """A local service did not start, died, or is already running on this home (HTTP errors are ApiException)."""


def describe(e: ApiException) -> str:
    """One line for an HTTP error of the client (its str() spans lines and includes every response header)."""
    return f"HTTP {e.status} {e.reason or ''}: {(e.body or '').strip()[:1000]}".replace(" :", ":")


class _ApiClient(ApiClient):
    """Airflow's generated client with a default timeout on every request."""

    def call_api(self, method: Any, url: Any, header_params: Any = None, body: Any = None, post_params: Any = None,
                 _request_timeout: Any = None) -> Any:
        return super().call_api(method, url, header_params, body, post_params, _request_timeout or REQUEST_TIMEOUT)


class LocalAirflow:
    """api-server, scheduler and dag-processor as subprocesses on 127.0.0.1; always stopped on exit.

    Order matters: the api-server (which hosts the execution API) must answer before the scheduler starts,
    else the first tasks it hands to workers fail with "connection refused". A lock file keeps a second
    LocalAirflow off the same home (two schedulers on one SQLite DB).
    """

    def __init__(self, home: Path | str | None = None, dags_folder: Path | str | None = None, *,
                 extra_env: Mapping[str, str] | None = None, start_timeout: float = 240, stop_timeout: float = 60,
                 quiet: bool = False) -> None:
        self.env = airflow_env(home, dags_folder, extra=extra_env)
        self.home = Path(self.env["AIRFLOW_HOME"])
        self.dags_folder = Path(self.env["AIRFLOW__CORE__DAGS_FOLDER"])
        self.url = self.env["AIRFLOW__API__BASE_URL"]
        self.logs = self.home / "process-logs"
        self.start_timeout, self.stop_timeout, self.quiet = start_timeout, stop_timeout, quiet
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._lock: IO[str] | None = None
        self._anonymous = _ApiClient(Configuration(host=self.url))  # health and login only
        self._client: ApiClient | None = None  # with a bearer token, made on first use

    def _say(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    def cli(self, *args: str, timeout: float = 300) -> str:
        r = subprocess.run([_airflow_bin(), *args], env=self.env, cwd=self.home, capture_output=True, text=True,
                           timeout=timeout, check=False)
        if r.returncode != 0:
            raise AirflowError(f"`airflow {' '.join(args)}` failed ({r.returncode}): {(r.stderr or r.stdout)[-3000:]}")
        return r.stdout

    def _spawn(self, name: str, *args: str) -> None:
        self.logs.mkdir(exist_ok=True, mode=0o700)
        with open(self.logs / f"{name}.log", "ab") as log:
            # own session: Ctrl-C reaches only us (we stop them in order), and killpg catches task workers too
            self.procs[name] = subprocess.Popen([_airflow_bin(), name, *args], env=self.env, cwd=self.home,
                                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                start_new_session=True)

    def _check_alive(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                tail = (self.logs / f"{name}.log").read_text(errors="replace")[-3000:]
                raise AirflowError(f"airflow {name} exited with {p.returncode}; end of its log:\n{tail}")

    def health(self) -> HealthInfoResponse | None:
        """The api-server's health answer, or None while it does not answer (yet)."""
        try:
            return MonitorApi(self._anonymous).get_health(_request_timeout=HEALTH_TIMEOUT)
        except (ApiException, urllib3.exceptions.HTTPError, OSError, ValueError):
            return None

    def _wait(self, what: str, ok: Callable[[HealthInfoResponse], bool]) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            self._check_alive()
            h = self.health()
            if h is not None and ok(h):
                return
            if time.monotonic() > deadline:
                last = h.to_dict() if h is not None else None
                raise AirflowError(f"{what} not healthy after {self.start_timeout:.0f} s (last: {last}); logs in {self.logs}")
            time.sleep(0.5)

    def __enter__(self) -> LocalAirflow:
        self._lock = open(self.home / ".local_airflow.lock", "w")  # held until stop()
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            self._lock = None
            raise AirflowError(f"another LocalAirflow is running on {self.home}") from None
        try:
            t0 = time.monotonic()
            self._say(f"airflow home {self.home}: migrating the DB, serializing {self.dags_folder}")
            self.cli("db", "migrate")
            self._spawn("api-server")
            self.cli("dags", "reserialize")  # else the DAG is unknown until the dag-processor's first pass
            self._wait("api-server", lambda h: h.metadatabase.status == "healthy")
            self._spawn("scheduler", "--skip-serve-logs")
            self._spawn("dag-processor")
            self._wait("scheduler and dag-processor", lambda h: all(
                c is not None and c.status == "healthy" for c in (h.scheduler, h.dag_processor)))
            self._say(f"airflow up on {self.url} in {time.monotonic() - t0:.0f} s")
        except BaseException:  # KeyboardInterrupt included: never leave half-started services behind
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """SIGTERM all (the scheduler waits for running tasks), then SIGKILL each process group after a timeout."""
        for p in self.procs.values():
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.terminate()
        deadline = time.monotonic() + self.stop_timeout
        for name, p in self.procs.items():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._say(f"airflow {name} did not stop in {self.stop_timeout:.0f} s: killing it")
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)  # leftovers in its group (workers, task supervisors)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)
        self.procs.clear()
        for client in (self._anonymous, self._client):  # idle keep-alive connections to the gone api-server
            if client is not None:
                client.rest_client.pool_manager.clear()
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # -- REST (api-server); each CLI call costs ~7 s of imports on 2 cores, a REST call a few ms ---------------

    def _login(self) -> str:
        """A JWT for the admin from the simple auth manager's /auth/token (not part of the generated API), sent
        through the client's own transport; the password is read from its 0600 file, never logged."""
        password = json.loads((self.home / PASSWORDS_FILE).read_text())[ADMIN]
        c = self._anonymous
        request = c.param_serialize("POST", "/auth/token", header_params={
            "Content-Type": "application/json", "Accept": "application/json"}, body={"username": ADMIN, "password": password})
        response = c.call_api(*request)
        response.read()
        answer: Any = c.response_deserialize(response, {"2XX": "object"}).data
        return str(answer["access_token"])

    @property
    def client(self) -> ApiClient:
        """The authenticated API client (logs in on first use)."""
        if self._client is None:
            self._client = _ApiClient(Configuration(host=self.url, access_token=self._login()))
        return self._client

    @property
    def dags(self) -> DAGApi:
        return DAGApi(self.client)

    @property
    def dag_runs(self) -> DagRunApi:
        return DagRunApi(self.client)

    @property
    def backfills(self) -> BackfillApi:
        return BackfillApi(self.client)


# -- backfill --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DateResult:
    date: str
    state: str
    duration_s: float | None
    run_id: str | None


def _midnight(d: dt.date) -> dt.datetime:
    return dt.datetime.combine(d, dt.time(), tzinfo=dt.UTC)


def _day(run: DAGRunResponse) -> str | None:
    return run.logical_date.date().isoformat() if run.logical_date else None


def _runs(af: LocalAirflow, dag_id: str, start: dt.date, end: dt.date) -> list[DAGRunResponse]:
    """The DAG's runs with a logical date in [start, end], whatever created them."""
    return af.dag_runs.get_dag_runs(dag_id, logical_date_gte=_midnight(start), logical_date_lte=_midnight(end),
                                    limit=1000).dag_runs


def _abandon(af: LocalAirflow, dag_id: str, backfill_id: int, start: dt.date, end: dt.date, settle: float = 30.0,
             poll: float = 1.0) -> None:
    """Cancel the backfill (fails its queued runs) and fail its running ones: cancel alone leaves those
    `running` in the DB, and the scheduler of the next `make backfill` on this home would carry them on.

    Checked until none is live, a poll after each write: on SQLite the scheduler can write back `running` over
    a run failed a moment earlier (it had read the run as queued; SQLite has no row locks), so one pass is not
    enough."""
    with contextlib.suppress(ApiException):
        af.backfills.cancel_backfill(backfill_id)
    deadline = time.monotonic() + settle
    while True:
        time.sleep(poll)
        try:
            runs = _runs(af, dag_id, start, end)
        except ApiException as e:
            if time.monotonic() > deadline:
                af._say(f"warning: could not check that backfill {backfill_id} left no live run: {describe(e)}")
                return
            continue
        live = [r.dag_run_id for r in runs if r.run_type == DagRunType.BACKFILL and r.state.value not in TERMINAL]
        if not live:
            return
        if time.monotonic() > deadline:
            af._say(f"warning: backfill {backfill_id} runs still live after {settle:.0f} s: {', '.join(live)}")
            return
        for run_id in live:
            with contextlib.suppress(ApiException):
                af.dag_runs.patch_dag_run(dag_id, run_id, DAGRunPatchBody(state=DagRunMutableStates.FAILED))


def _close_open_backfills(af: LocalAirflow, dag_id: str) -> None:
    """A finished backfill is only marked complete by the scheduler's 30 s sweep, and until then a new one is
    refused (409): close any open one (cancel fails only still-queued runs; LocalAirflow's lock means none of
    ours is live)."""
    for b in af.backfills.list_backfills(dag_id, limit=100).backfills:
        if b.completed_at is None:
            af._say(f"closing earlier backfill {b.id} of {dag_id}")
            with contextlib.suppress(ApiException):
                af.backfills.cancel_backfill(b.id)


BACKFILL_CREATE_ATTEMPTS = 5


def _create_backfill(af: LocalAirflow, body: BackfillPostBody, wait: float = 2.0) -> BackfillResponse:
    """POST the backfill, retrying while SQLite is locked by the scheduler: Airflow answers 503 "Database is
    locked" and removes the half-made backfill (best effort, so any that is left open is closed before the
    retry). Seen once, in a fresh-clone CI run on 2 cores."""
    for attempt in range(1, BACKFILL_CREATE_ATTEMPTS + 1):
        try:
            return af.backfills.create_backfill(body)
        except ApiException as e:
            if e.status != 503 or attempt == BACKFILL_CREATE_ATTEMPTS:
                raise
            af._say(f"backfill of {body.dag_id} refused ({describe(e)[:120]}); retry {attempt} in {wait * attempt:.0f} s")
            time.sleep(wait * attempt)
            _close_open_backfills(af, body.dag_id)
    raise AssertionError("unreachable")


def _run_backfill(af: LocalAirflow, dag_id: str, start: dt.date, end: dt.date, timeout: float,
                  max_active_runs: int, poll: float) -> list[DateResult]:
    af.dags.patch_dag(dag_id, DAGPatchBody(is_paused=False))  # backfill runs of a paused DAG never start
    _close_open_backfills(af, dag_id)
    # reprocess "completed": re-runs done dates too, so a second backfill rebuilds them
    body = BackfillPostBody(dag_id=dag_id, from_date=_midnight(start), to_date=_midnight(end),
                            max_active_runs=max_active_runs, reprocess_behavior=ReprocessBehavior.COMPLETED)
    planned = af.backfills.create_backfill_dry_run(body).backfills
    dates = sorted({p.logical_date.date().isoformat() for p in planned if p.logical_date})
    if not dates:
        raise DataError(f"{dag_id} has no logical date between {start} and {end}",
                        "widen the range (weekly DAGs run on one day a week)")
    backfill = _create_backfill(af, body)
    created = backfill.created_at
    af._say(f"backfill {backfill.id} of {dag_id}: {len(dates)} logical date(s) {dates[0]} .. {dates[-1]}")

    def fresh(r: DAGRunResponse) -> bool:  # a reprocessed date keeps its run row: only one queued by this backfill counts
        return r.queued_at is not None and r.queued_at >= created

    deadline = time.monotonic() + timeout
    latest: dict[str, DAGRunResponse] = {}
    try:
        while True:
            af._check_alive()
            latest = {d: r for r in _runs(af, dag_id, start, end) if (d := _day(r))}
            done = [d for d in dates if (r := latest.get(d)) is not None and fresh(r) and r.state.value in TERMINAL]
            if len(done) == len(dates):
                break
            if time.monotonic() > deadline:
                af._say(f"timeout after {timeout:.0f} s: cancelling backfill {backfill.id}")
                _abandon(af, dag_id, backfill.id, start, end)
                break
            time.sleep(poll)
    except BaseException:  # Ctrl-C: leave no run that the next start of this home would pick up again
        with contextlib.suppress(Exception):
            _abandon(af, dag_id, backfill.id, start, end)
        raise
    results = []
    for d in dates:
        r = latest.get(d)
        if r is not None and fresh(r):
            state = r.state.value if r.state.value in TERMINAL else f"timeout ({r.state.value})"
            results.append(DateResult(d, state, r.duration, r.dag_run_id))
        else:
            results.append(DateResult(d, "not run", None, r.dag_run_id if r else None))
    return results


def format_table(dag_id: str, results: list[DateResult]) -> str:
    lines = [f"{dag_id}: {sum(r.state == 'success' for r in results)}/{len(results)} succeeded",
             f"{'date':<10}  {'state':<18}  {'duration':>9}"]
    for r in results:
        dur = f"{r.duration_s:8.1f}s" if r.duration_s is not None else "        -"
        lines.append(f"{r.date:<10}  {r.state:<18}  {dur}")
    return "\n".join(lines)


def backfill(dag_id: str, start: str, end: str, *, timeout: float = 6 * 3600, max_active_runs: int = 2,
             home: Path | str | None = None, dags_folder: Path | str | None = None,
             airflow: LocalAirflow | None = None, extra_env: Mapping[str, str] | None = None,
             poll: float = 2.0, out: IO[str] | None = None) -> int:
    """Backfill [start, end] (inclusive) of one DAG; print a per-date table; 0 only if every date succeeded.

    `airflow`: an already started LocalAirflow to reuse (tests); else one is started and stopped here.
    Raises DataError for a bad DAG id or dates, before anything is started.
    """
    folder = airflow.dags_folder if airflow else (Path(dags_folder).resolve() if dags_folder else REPO_DAGS)
    check_dag_id(dag_id, folder)
    d0, d1 = check_range(start, end)
    if timeout <= 0 or max_active_runs < 1:
        raise DataError("timeout and max_active_runs must be positive", "pass --timeout S > 0, --max-active-runs N >= 1")
    with contextlib.ExitStack() as stack:
        af = airflow or stack.enter_context(LocalAirflow(home, dags_folder, extra_env=extra_env))
        results = _run_backfill(af, dag_id, d0, d1, timeout, max_active_runs, poll)
    print(format_table(dag_id, results), file=out or sys.stdout, flush=True)
    failed = [r.date for r in results if r.state != "success"]
    if failed:
        print(f"not successful: {', '.join(failed)} (task logs: {af.home / 'logs'})", file=out or sys.stdout, flush=True)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.orchestration.dev.local_airflow", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("backfill", help="run a date range of one DAG through a local Airflow")
    b.add_argument("--dag", default="daily_inference")
    b.add_argument("--start", required=True, help="first logical date, YYYY-MM-DD")
    b.add_argument("--end", required=True, help="last logical date (inclusive), YYYY-MM-DD")
    b.add_argument("--timeout", type=float, default=6 * 3600, help="seconds to wait for all runs (default 6 h)")
    b.add_argument("--max-active-runs", type=int, default=2)
    b.add_argument("--home", help="Airflow home (default RECSYS_HOME/airflow)")
    b.add_argument("--dags-folder", help="default: the repo's dags/")
    a = p.parse_args(argv)
    try:
        return backfill(a.dag, a.start, a.end, timeout=a.timeout, max_active_runs=a.max_active_runs, home=a.home,
                        dags_folder=a.dags_folder)
    except (DataError, AirflowError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ApiException as e:
        print(f"error: the Airflow API answered {describe(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: airflow stopped, backfill cancelled", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
