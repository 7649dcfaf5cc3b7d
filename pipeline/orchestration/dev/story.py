"""`make run`: the whole story on the embedded default, through Airflow's own runner.

synthetic events → the weekly DAG (build-matrix → train → gate/promote) → the daily DAG for a date
(wait for a champion → infer → publish), then where the model, the gate report and the recommendations are.
Everything lives under RECSYS_HOME (default ./out/home from the Makefile); re-running replaces, never duplicates.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from pipeline.data.synth_events import SynthEventsJob
from pipeline.io.dates import parse_date
from pipeline.io.redact import redact_uri
from pipeline.orchestration.dev.local_airflow import airflow_env
from pipeline.orchestration.steps import Settings

REPO = Path(__file__).resolve().parents[3]  # <repo>/pipeline/orchestration/dev/story.py -> <repo>


def _run(cmd: list[str], env: dict[str, str], what: str) -> None:
    t0 = time.perf_counter()
    print(f"\n== {what}\n   $ {' '.join(cmd)}", flush=True)
    rc = subprocess.run(cmd, env=env).returncode
    if rc != 0:
        raise SystemExit(f"make run: {what} failed (exit {rc}); see the output above")
    print(f"   ({time.perf_counter() - t0:.0f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    """`make run`: synthetic events, the weekly DAG, the daily DAG, then where everything is."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--home", type=Path, default=Path(os.environ.get("RECSYS_HOME", REPO / "out" / "home")))
    p.add_argument("--users", type=int, default=3000)
    p.add_argument("--items", type=int, default=800)
    p.add_argument("--days", type=int, default=28)
    p.add_argument("--start", default="2026-01-01", help="first day of the synthetic events")
    p.add_argument("--date", default=None, help="the daily run's date (default: the last day of events)")
    args = p.parse_args(argv)
    home = args.home.expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    start = parse_date(args.start)
    last_day = start + dt.timedelta(days=args.days - 1)
    date = parse_date(args.date).isoformat() if args.date else last_day.isoformat()

    recsys_env = {"RECSYS_HOME": str(home), "RECSYS_TRAIN_CONFIG": str(REPO / "configs" / "embedded-train.yaml"),
                  "RECSYS_WINDOW_DAYS": str(args.days), "RECSYS_SPARK_MASTER": "local[2]",
                  "RECSYS_TOP_N": "100", "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable,
                  # a failing task retries at once, not after the DAGs' production back-off of minutes
                  "AIRFLOW__CORE__MAX_TASK_RETRY_DELAY": "1"}
    os.environ.update(recsys_env)
    env = airflow_env(home / "airflow", extra=recsys_env)
    settings = Settings.from_env()
    airflow = str(Path(sys.executable).with_name("airflow"))

    t0 = time.perf_counter()
    print("\n== synthetic events", flush=True)
    ev = SynthEventsJob(users=args.users, items=args.items, days=args.days, start=start, out=settings.events_uri,
                        seed=0).run()
    print(f"   {ev.events:,} events in {ev.files} files under {ev.uri} ({time.perf_counter() - t0:.0f} s)", flush=True)
    _run([airflow, "db", "migrate"], env, "Airflow metadata DB (SQLite, under RECSYS_HOME/airflow)")
    # the weekly run whose data interval ends the day after the last event day: as-of = that last day
    # (Airflow infers the run's data interval from the weekly timetable; as-of = its end - 1 day, events up to it)
    weekly_logical = (last_day + dt.timedelta(days=1)).isoformat()
    _run([airflow, "dags", "test", "weekly_train", weekly_logical], env, "weekly DAG: build-matrix → train → gate")
    _run([airflow, "dags", "test", "daily_inference", date], env, f"daily DAG for {date}: champion → infer → publish")

    from pipeline.io.registry import alias_version, version_tags
    from pipeline.serving.recs import read_recommendations

    version = alias_version(settings.model_name, "champion", settings.tracking_uri)
    tags = version_tags(settings.model_name, str(version), settings.tracking_uri) if version else {}
    recs = read_recommendations(settings.recs_uri, date)
    print("\n== where things are")
    print(f"   events:           {settings.events_uri}")
    print(f"   snapshots:        {settings.lake_uri}/snapshots/")
    shown = redact_uri(settings.tracking_uri)  # a remote store's URI may carry user:password
    print(f"   MLflow:           {shown} (artifacts under {home / 'artifacts'}; `mlflow ui "
          f"--backend-store-uri {shown}`)")
    print(f"   champion:         models:/{settings.model_name}@champion = version {version} "
          f"(gate: {tags.get('gate.verdict', '?')}; report: the version's MLflow run, artifacts gate/)")
    print(f"   recommendations:  {settings.recs_uri}/recommendations/dt={date}/ ({recs.num_rows:,} users)")
    if recs.num_rows:
        row = recs.slice(0, 1).to_pylist()[0]
        print(f"   e.g. user {row['user_id']}: {json.dumps([str(i) for i in list(row['item_ids'])[:10]])} ...")
        print(f"   read one user:    recsys recs --date {date} --user {row['user_id']} --out {settings.recs_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
