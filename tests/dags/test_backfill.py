"""`make backfill` machinery (pipeline.orchestration.dev.local_airflow) against a real local Airflow 3.3 and test-only DAGs.

The slow tests share one LocalAirflow (api-server + scheduler + dag-processor, about a minute to start on 2
cores) over tests/dags/fixtures, whose tasks only write `<logical date>.txt` files: no recsys jobs run.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import stat
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
from airflow_client.client.exceptions import ApiException
from airflow_client.client.models.backfill_post_body import BackfillPostBody
from airflow_client.client.models.backfill_response import BackfillResponse
from airflow_client.client.models.dag_run_response import DAGRunResponse
from airflow_client.client.models.dag_run_state import DagRunState
from airflow_client.client.models.dag_run_type import DagRunType

from pipeline.errors import DataError
from pipeline.orchestration.dev import local_airflow as al

FIXTURES = Path(__file__).resolve().parent / "fixtures"


# -- fast: config, validation ----------------------------------------------------------------------------------

def test_airflow_env_is_loopback_bounded_and_keeps_secrets_in_the_home(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("AIRFLOW__CORE__PARALLELISM", "32")  # a shell's foreign Airflow config must not leak in
    monkeypatch.setenv("AIRFLOW__CORE__SQL_ALCHEMY_CONN", "postgresql://prod/airflow")
    env = al.airflow_env(tmp_path / "home", FIXTURES, port=18123)
    home = tmp_path / "home"

    assert env["AIRFLOW_HOME"] == str(home) and env["AIRFLOW__CORE__DAGS_FOLDER"] == str(FIXTURES)
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == f"sqlite:///{home}/airflow.db"
    assert "AIRFLOW__CORE__SQL_ALCHEMY_CONN" not in env
    assert 2 <= int(env["AIRFLOW__CORE__PARALLELISM"]) <= 4
    assert env["AIRFLOW__API__HOST"] == "127.0.0.1" and env["AIRFLOW__API__PORT"] == "18123"
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://127.0.0.1:18123/execution/"
    assert env["AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_HOST"] == "127.0.0.1"
    assert env["AIRFLOW__CORE__LOAD_EXAMPLES"] == "False" and env["AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION"] == "False"
    assert env["AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE"] == "False"
    assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS"] == "False"

    # the secrets exist, only in 0600 files under the home, and appear in no variable and no output
    cfg = (home / "airflow.cfg").read_text()
    secret_values = [line.split("=", 1)[1].strip() for line in cfg.splitlines()
                     if line.split("=")[0].strip() in ("fernet_key", "secret_key", "jwt_secret")]
    secret_values += list(json.loads((home / al.PASSWORDS_FILE).read_text()).values())
    assert len(secret_values) == 4 and all(len(v) >= 20 for v in secret_values)
    for f in (home / "airflow.cfg", home / al.PASSWORDS_FILE):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    assert not any(s in v for s in secret_values for v in env.values())
    assert not [k for k in env if k.startswith("AIRFLOW") and any(w in k for w in ("SECRET", "JWT", "FERNET", "PASSWORD="))]
    out = capsys.readouterr()
    assert not any(s in out.out + out.err for s in secret_values)

    # a second call keeps the same secrets (tokens signed before a restart stay valid; the DB's fernet key too)
    al.airflow_env(home, FIXTURES)
    assert (home / "airflow.cfg").read_text() == cfg


def test_dag_ids_are_read_from_the_files_without_importing_them() -> None:
    assert al.dag_ids_in(al.REPO_DAGS) >= {"weekly_train", "daily_inference"}
    assert al.dag_ids_in(FIXTURES) == {"backfill_probe_ok", "backfill_probe_fail"}


@pytest.mark.parametrize(("dag", "start", "end", "message"), [
    ("no_such_dag", "2026-01-01", "2026-01-02", "no DAG 'no_such_dag'"),
    ("x; rm -rf /", "2026-01-01", "2026-01-02", "invalid DAG id"),
    ("daily_inference", "2026-02-30", "2026-03-01", "invalid start date"),
    ("daily_inference", "2026-01-01", "20260102", "invalid end date"),
    ("daily_inference", "2026-1-1", "2026-01-02", "invalid start date"),
    ("daily_inference", "2026-01-05", "2026-01-01", "is after end"),
])
def test_bad_dag_or_dates_fail_before_anything_starts(tmp_path, capsys, dag, start, end, message) -> None:
    home = tmp_path / "home"
    with pytest.raises(DataError, match=message):
        al.backfill(dag, start, end, home=home)
    assert al.main(["backfill", "--dag", dag, "--start", start, "--end", end, "--home", str(home)]) == 2
    assert message in capsys.readouterr().err
    assert not home.exists()  # nothing was created, migrated or started


def _http_error(status: int, detail: str) -> ApiException:
    """What the generated client raises for a non-2xx answer."""
    return ApiException(status=status, reason="Service Unavailable" if status == 503 else "Conflict",
                        body=json.dumps({"detail": detail}))


def _backfill(backfill_id: int, completed: bool = False) -> BackfillResponse:
    return BackfillResponse.model_construct(id=backfill_id, created_at=dt.datetime(2024, 1, 1, tzinfo=dt.UTC),
                                            completed_at=dt.datetime(2024, 1, 2, tzinfo=dt.UTC) if completed else None)


def _dag_run(run_id: str, run_type: str, state: str) -> DAGRunResponse:
    return DAGRunResponse.model_construct(dag_run_id=run_id, run_type=DagRunType(run_type), state=DagRunState(state),
                                          logical_date=dt.datetime(2026, 1, 10, tzinfo=dt.UTC))


class _LockedBackfills:
    """Stands in for the client's BackfillApi only (a real SQLite lock cannot be provoked on demand): creating a
    backfill answers 503 `locked` times, and one half-made backfill stays open after the first refusal."""

    def __init__(self, locked: int, status: int = 503) -> None:
        self.locked, self.status = locked, status
        self.calls: list[tuple[str, object]] = []

    def create_backfill(self, body: BackfillPostBody) -> BackfillResponse:
        self.calls.append(("create", body.dag_id))
        if self.locked:
            self.locked -= 1
            raise _http_error(self.status, "Database is locked")
        return _backfill(7)

    def list_backfills(self, dag_id: str, limit: int | None = None) -> SimpleNamespace:
        self.calls.append(("list", dag_id))
        return SimpleNamespace(backfills=[_backfill(5, completed=True), _backfill(6)])

    def cancel_backfill(self, backfill_id: int) -> None:
        self.calls.append(("cancel", backfill_id))


def _body(dag_id: str = "d") -> BackfillPostBody:
    return BackfillPostBody(dag_id=dag_id, from_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
                            to_date=dt.datetime(2026, 1, 2, tzinfo=dt.UTC))


def test_backfill_creation_retries_while_sqlite_is_locked() -> None:
    af = SimpleNamespace(backfills=_LockedBackfills(locked=2), _say=lambda text: None)
    assert al._create_backfill(af, _body(), wait=0.0).id == 7  # type: ignore[arg-type]
    calls = af.backfills.calls
    assert calls.count(("create", "d")) == 3 and calls.count(("cancel", 6)) == 2  # left-overs closed
    assert ("cancel", 5) not in calls  # a completed one is left alone
    with pytest.raises(ApiException) as e:
        al._create_backfill(SimpleNamespace(backfills=_LockedBackfills(locked=99), _say=print), _body(),  # type: ignore[arg-type]
                            wait=0.0)
    assert e.value.status == 503 and al.describe(e.value) == 'HTTP 503 Service Unavailable: {"detail": "Database is locked"}'
    refused = SimpleNamespace(backfills=_LockedBackfills(locked=1, status=409), _say=print)  # only a lock is retried
    with pytest.raises(ApiException, match="409"):
        al._create_backfill(refused, _body(), wait=0.0)  # type: ignore[arg-type]
    assert refused.backfills.calls == [("create", "d")]


class _RacingScheduler:
    """Stands in for the client's BackfillApi and DagRunApi only (the scheduler's timing cannot be forced): the
    run is `queued` at cancel time, and the scheduler writes `running` back over the first PATCH to `failed`, as
    it can on SQLite when it read the run before the cancel."""

    def __init__(self, write_backs: int = 1, gets_failing: int = 0) -> None:
        self.state, self.write_backs, self.gets_failing = "queued", write_backs, gets_failing
        self.calls: list[tuple[str, ...]] = []
        self.said: list[str] = []
        self.backfills = self.dag_runs = self

    def cancel_backfill(self, backfill_id: int) -> None:  # fails queued runs, but the scheduler starts this one
        self.calls.append(("cancel", str(backfill_id)))
        self.state = "running"

    def patch_dag_run(self, dag_id: str, dag_run_id: str, body: object) -> None:
        self.calls.append(("patch", dag_id, dag_run_id, body.state.value))  # type: ignore[attr-defined]
        if self.write_backs:
            self.write_backs -= 1
            self.state = "running"
        else:
            self.state = "failed"

    def get_dag_runs(self, dag_id: str, **query: object) -> SimpleNamespace:
        self.calls.append(("list", dag_id))
        assert query["logical_date_gte"] == dt.datetime(2026, 1, 10, tzinfo=dt.UTC)
        assert query["logical_date_lte"] == dt.datetime(2026, 1, 11, tzinfo=dt.UTC)
        if self.gets_failing:
            self.gets_failing -= 1
            raise _http_error(500, "database is locked")
        return SimpleNamespace(dag_runs=[_dag_run("backfill__2026-01-10", "backfill", self.state),
                                         _dag_run("manual__x", "manual", "running")])

    def _say(self, text: str) -> None:
        self.said.append(text)


def test_abandon_fails_runs_again_until_none_is_live() -> None:
    start, end = dt.date(2026, 1, 10), dt.date(2026, 1, 11)
    af = _RacingScheduler(write_backs=1, gets_failing=1)
    al._abandon(af, "d", 3, start, end, settle=5.0, poll=0.0)  # type: ignore[arg-type]
    assert af.state == "failed"
    assert [c for c in af.calls if c[0] == "patch"] == [("patch", "d", "backfill__2026-01-10", "failed")] * 2
    assert af.calls[0] == ("cancel", "3") and af.said == []  # a manual run is not ours

    stuck = _RacingScheduler(write_backs=10**6)  # never settles: a warning names the run, no endless loop
    al._abandon(stuck, "d", 3, start, end, settle=0.05, poll=0.01)  # type: ignore[arg-type]
    assert stuck.state == "running" and "backfill__2026-01-10" in stuck.said[-1]


# -- slow: a real Airflow -------------------------------------------------------------------------------------

def _descendants(af: al.LocalAirflow) -> set[int]:
    pids: set[int] = set()
    for p in af.procs.values():
        try:
            proc = psutil.Process(p.pid)
            pids |= {proc.pid, *(c.pid for c in proc.children(recursive=True))}
        except psutil.NoSuchProcess:
            continue
    return pids


def _airflow_processes_for(home: Path) -> list[psutil.Process]:
    """Live processes whose environment points at this Airflow home (i.e. anything we started)."""
    found = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.environ().get("AIRFLOW_HOME") == str(home):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


@pytest.fixture(scope="module")
def airflow(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("backfill")
    out = root / "out"
    af = al.LocalAirflow(root / "home", FIXTURES, extra_env={"BACKFILL_PROBE_OUT": str(out)}, quiet=True)
    af.seen_pids = set()  # type: ignore[attr-defined]  # every service/worker pid seen, checked at the end
    with af:
        af.seen_pids |= _descendants(af)  # type: ignore[attr-defined]
        yield af, out


def _backfill_range(af: al.LocalAirflow, dag: str, start: str, end: str) -> tuple[int, str]:
    buf = io.StringIO()
    rc = al.backfill(dag, start, end, airflow=af, timeout=240, poll=1, out=buf)
    af.seen_pids |= _descendants(af)  # type: ignore[attr-defined]  # LocalExecutor workers exist by now
    return rc, buf.getvalue()


@pytest.mark.slow
def test_backfill_two_days_then_again_is_identical(airflow) -> None:
    af, out = airflow
    rc, table = _backfill_range(af, "backfill_probe_ok", "2026-01-01", "2026-01-02")
    assert rc == 0, table
    assert "2026-01-01  success" in table and "2026-01-02  success" in table
    first = {f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in out.iterdir()}
    assert sorted(first) == ["2026-01-01.txt", "2026-01-02.txt"]
    assert first["2026-01-01.txt"][0] == b"logical date 2026-01-01\n"

    rc, table = _backfill_range(af, "backfill_probe_ok", "2026-01-01", "2026-01-02")  # reprocess: both dates run again
    assert rc == 0, table
    again = {f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in out.iterdir()}
    assert sorted(again) == sorted(first)  # one file per date, nothing appended or duplicated
    for name, (content, mtime) in again.items():
        assert content == first[name][0]
        assert mtime > first[name][1], f"{name} was not rewritten: the second backfill did not re-run it"


@pytest.mark.slow
def test_a_failing_date_is_reported_and_returns_nonzero(airflow) -> None:
    af, out = airflow
    rc, table = _backfill_range(af, "backfill_probe_fail", "2026-01-03", "2026-01-04")  # the probe fails on even days
    assert rc == 1, table
    assert "2026-01-03  success" in table and "2026-01-04  failed" in table
    assert "not successful: 2026-01-04" in table
    assert (out / "2026-01-03.txt").exists() and not (out / "2026-01-04.txt").exists()


@pytest.mark.slow
def test_a_timeout_cancels_and_leaves_no_live_run(airflow) -> None:
    af, _ = airflow
    buf = io.StringIO()
    rc = al.backfill("backfill_probe_ok", "2026-01-10", "2026-01-11", airflow=af, timeout=0.1, poll=0.1, out=buf)
    table = buf.getvalue()
    assert rc == 1 and "timeout (" in table and "not successful: 2026-01-10, 2026-01-11" in table, table
    runs = af.dag_runs.get_dag_runs("backfill_probe_ok", logical_date_gte=dt.datetime(2026, 1, 10, tzinfo=dt.UTC)).dag_runs
    assert runs and all(r.state.value in al.TERMINAL for r in runs)  # nothing a later start would carry on
    assert all(b.completed_at for b in af.backfills.list_backfills("backfill_probe_ok").backfills)


@pytest.mark.slow
def test_second_local_airflow_on_the_same_home_is_refused(airflow) -> None:
    af, _ = airflow
    with pytest.raises(al.AirflowError, match="another LocalAirflow"), al.LocalAirflow(af.home, FIXTURES, quiet=True):
        pass


@pytest.mark.slow
def test_services_are_stopped_afterwards(airflow) -> None:
    af, _ = airflow
    pids = af.seen_pids | _descendants(af)  # type: ignore[attr-defined]
    assert len(pids) >= 3
    af.stop()  # what the context manager's exit does; idempotent, so the fixture's own exit is a no-op
    alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert alive == []
    assert _airflow_processes_for(af.home) == []


@pytest.mark.slow
def test_ctrl_c_during_start_still_stops_what_it_started(tmp_path, monkeypatch) -> None:
    """Ctrl-C while the api-server is already up and `dags reserialize` runs: the api-server is stopped too."""
    def cli(self: al.LocalAirflow, *args: str, timeout: float = 300) -> str:
        if args[:2] == ("dags", "reserialize"):
            self.started_pids = _descendants(self)  # type: ignore[attr-defined]
            raise KeyboardInterrupt
        return ""  # `db migrate`: skipped, the api-server is stopped before it needs a DB

    monkeypatch.setattr(al.LocalAirflow, "cli", cli)
    af = al.LocalAirflow(tmp_path / "home", FIXTURES, quiet=True)
    with pytest.raises(KeyboardInterrupt), af:
        pass
    assert af.procs == {} and af.started_pids  # type: ignore[attr-defined]
    assert not [p for p in af.started_pids if psutil.pid_exists(p)]  # type: ignore[attr-defined]
    assert _airflow_processes_for(af.home) == []
