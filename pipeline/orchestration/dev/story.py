"""`make run`: the whole story on the embedded default, through Airflow's own runner, on one screen.

synthetic events → the weekly DAG (build-matrix → train → gate/promote) → the daily DAG for a date
(wait for a champion → infer → publish), then where the model, the gate report and the recommendations are.
Everything lives under RECSYS_HOME (default ./out/home from the Makefile); re-running replaces, never duplicates.

The terminal gets one line per step (with its duration; a live bar while a DAG runs, on a terminal only) and a
short summary. Everything else (Airflow's and the jobs' own logs, of subprocesses and of this process) goes to
RECSYS_HOME/logs/make-run.log, whose path is printed first, and again with its last lines when a step fails.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pipeline.io.dates import parse_date
from pipeline.io.redact import redact_uri
from pipeline.orchestration.settings import Settings

REPO = Path(__file__).resolve().parents[3]  # <repo>/pipeline/orchestration/dev/story.py -> <repo>
LOG_NAME = "make-run.log"
TAIL_LINES = 20
MAX_LINES = 40  # one screen: tests hold the whole output to this
# markers `airflow dags test` writes per task (Airflow 3.3's dag.test); epochs: the training job's per-epoch line
_TASK_START = re.compile(r"\[DAG TEST\] starting task_id=([\w.-]+)")
_TASK_END = re.compile(r"\[DAG TEST\] end task task_id=([\w.-]+)")
_EPOCH = re.compile(r"\bepoch (\d+(?:/\d+)?)")


class StepFailed(RuntimeError):
    """A step did not finish (its subprocess exited non-zero, or it raised): the story stops there."""


def duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s:02d} s"


def tail(path: Path, n: int = TAIL_LINES) -> list[str]:
    """The last `n` lines of a (possibly large) log file."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 256 * 1024))
        lines = f.read().decode(errors="replace").splitlines()
    return lines[-n:]


class Progress:
    """What a running step reports: tasks done out of a total, and what it is doing now. Drives a tqdm bar on a
    terminal; on anything else it stays silent (CI logs and `| cat` get the step lines only)."""

    def __init__(self, bar: Any = None) -> None:
        self.bar = bar
        self.done = 0
        self.now = ""

    def update(self, done: int, now: str = "") -> None:
        if (done, now) == (self.done, self.now):
            return
        self.done, self.now = done, now
        if self.bar is not None:
            self.bar.n = done
            self.bar.set_postfix_str(now, refresh=False)
            self.bar.refresh()


@dataclass(frozen=True)
class Step:
    """One line of the story: `run(progress)` does the work and returns a short detail for its line."""

    title: str
    run: Callable[[Progress], str]
    tasks: int | None = None  # a DAG's task count: a bar with that total (a spinner-like counter when None)
    live: bool = False  # long: show a live indicator while it runs


@dataclass
class Screen:
    """The terminal side: step lines, the failure block, the summary. `tty` decides bars and escape codes."""

    out: IO[str]
    log: Path
    tty: bool = False
    lines: list[str] = field(default_factory=list)

    def say(self, text: str = "") -> None:
        self.lines.append(text)
        print(text, file=self.out, flush=True)

    def _mark(self, ok: bool) -> str:
        utf8 = "utf" in (getattr(self.out, "encoding", None) or "utf-8").lower()
        return ("✓" if ok else "✗") if utf8 else ("ok" if ok else "FAILED")

    def run(self, step: Step) -> str:
        """Run one step, then print its line: mark, title, duration, detail. Raises StepFailed (after printing
        the failure with the log's path and its last lines)."""
        bar = None
        if self.tty and step.live:
            from tqdm import tqdm

            bar = tqdm(total=step.tasks, desc=f"  {step.title}", file=self.out, leave=False, ncols=_width(self.out),
                       bar_format="{desc} {bar:20} {n_fmt}/{total_fmt} tasks {elapsed}{postfix}" if step.tasks
                       else "{desc} {elapsed}{postfix}")  # tqdm puts ", " before a postfix
        elif step.live:
            self.say(f"  … {step.title} (running; log: {self.log.name})")
        t0 = time.perf_counter()
        try:
            with _ticking(bar):
                detail = step.run(Progress(bar))
        except BaseException as e:
            if bar is not None:
                bar.close()
            took = duration(time.perf_counter() - t0)
            self.say(f"  {self._mark(False)} {step.title}  (after {took})")
            if isinstance(e, KeyboardInterrupt):
                raise
            if not isinstance(e, StepFailed):
                traceback.print_exc()  # to the log (stderr is redirected there), for the developer
            why = str(e) if isinstance(e, StepFailed) else f"{type(e).__name__}: {e}"
            self.say(f"    {why}")
            self.say(f"    log: {self.log}; its last {TAIL_LINES} lines:")
            for line in tail(self.log):
                self.say(f"    | {line[:200]}")
            raise StepFailed(why) from e
        if bar is not None:
            bar.close()
        took = duration(time.perf_counter() - t0)
        self.say(f"  {self._mark(True)} {step.title:<52} {took:>10}  {detail}".rstrip())
        return detail


def _width(stream: IO[str]) -> int:
    """The terminal's width (a pseudo-terminal may say 0, and tqdm then draws nothing: 100 columns instead)."""
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError):
        columns = 0
    return max(columns - 1, 40) if columns > 0 else 100


@contextlib.contextmanager
def _ticking(bar: Any) -> Iterator[None]:
    """Refresh the bar's elapsed time every second even while nothing new happens (a long training task)."""
    if bar is None:
        yield
        return
    import threading

    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(1.0):
            bar.refresh()

    t = threading.Thread(target=tick, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()


def run_logged(cmd: Sequence[str], env: Mapping[str, str], log: Path, progress: Progress, poll: float = 0.5) -> str:
    """Run `cmd` with its stdout and stderr appended to `log`; report `airflow dags test`'s task markers (and the
    training's epochs) to `progress` while it runs. Returns 'N tasks' (N ended), raises StepFailed on a non-zero exit."""
    with open(log, "ab") as f:
        f.write(f"\n==== {time.strftime('%Y-%m-%dT%H:%M:%S')} $ {' '.join(cmd)}\n".encode())
        f.flush()
        start = f.tell()
        proc = subprocess.Popen(list(cmd), env=dict(env), stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    ended: list[str] = []
    current = ""
    with open(log, "rb") as r:
        r.seek(start)
        pending = b""
        while True:
            rc = proc.poll()
            chunk = r.read()
            if chunk:
                pending += chunk
                *complete, pending = pending.split(b"\n")
                for raw in complete:
                    line = raw.decode(errors="replace")
                    if m := _TASK_START.search(line):
                        current = m.group(1)
                    elif m := _TASK_END.search(line):
                        ended.append(m.group(1))
                    elif current and (m := _EPOCH.search(line)):
                        current = f"{current.split(' ')[0]} epoch {m.group(1)}"
                    else:
                        continue
                    progress.update(len(ended), current)
            if rc is not None and not chunk:
                break
            time.sleep(poll if rc is None else 0)
    if rc != 0:
        raise StepFailed(f"`{' '.join(Path(c).name if i == 0 else c for i, c in enumerate(cmd))}` exited with {rc}")
    return f"{len(ended)} tasks" if ended else ""


@contextlib.contextmanager
def output_to(log: Path) -> Iterator[None]:
    """Point this process's stdout and stderr (file descriptors 1 and 2: Python, native libraries, children) at
    `log` for the block; the terminal is reached only through the stream `terminal()` duplicated beforehand."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "ab") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    try:
        # sys.stdout/err too: they need not write to fds 1 and 2 (a replaced stream, a test's capture)
        with open(log, "a", buffering=1, errors="replace") as text, contextlib.redirect_stdout(text), \
                contextlib.redirect_stderr(text):
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def terminal() -> IO[str]:
    """A stream on the terminal (a duplicate of stdout) that stays there while output_to redirects fd 1."""
    return os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1, encoding=sys.stdout.encoding or "utf-8",
                     errors="replace")


def is_tty(stream: IO[str]) -> bool:
    return stream.isatty() and os.environ.get("TERM", "") != "dumb"


# -- the summary ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Summary:
    """What a person looks at after the run (all strings, ready to print)."""

    home: Path
    model_name: str
    version: str | None
    verdict: str
    ndcg: float | None
    run_id: str | None
    experiment_id: str | None
    recs_uri: str
    date: str
    users: int
    sample_user: str | None
    sample_items: tuple[str, ...]
    tracking: str
    gate_report: str | None = None  # the report file, when the run's artifacts are on this disk
    cold: tuple[int, int, int] | None = None  # new titles in the day's items: scored, shown, users shown one
    ablation: tuple[str, str, float] | None = None  # the ablation gate's status, the no-PIA twin, its test NDCG@100


def summary_lines(s: Summary, log: Path, total_s: float, mlflow_port: int = 5000) -> list[str]:
    ndcg = f", test NDCG@100 {s.ndcg:.4f}" if s.ndcg is not None else ""
    champion = (f"{s.model_name} version {s.version} is champion (gate {s.verdict}{ndcg})" if s.version
                else f"no champion for {s.model_name} (gate {s.verdict})")
    lines = ["", f"Done in {duration(total_s)}. Everything is under {s.home}", f"  model            {champion}"]
    if s.ablation is not None:
        status, twin, twin_ndcg = s.ablation
        lines.append(f"  PIA ablation     {status}: {twin} without PIA, trained beside it, test NDCG@100 {twin_ndcg:.4f}"
                     + (" (the gate report says why)" if status not in ("pass", "skipped") else ""))
    if s.run_id:
        url = f"http://127.0.0.1:{mlflow_port}/#/experiments/{s.experiment_id}/runs/{s.run_id}"
        lines.append(f"  gate report      {s.gate_report or 'artifacts gate/enabled/ of the version run'}")
        lines.append(f"                   in `make ui`: {url}")
    lines.append(f"  recommendations  {s.recs_uri} ({s.users:,} users for {s.date})")
    if s.sample_user is not None:
        shown = ", ".join(s.sample_items[:10]) + (", …" if len(s.sample_items) > 10 else "")
        lines.append(f"  user {s.sample_user}'s top 10: {shown}")
        lines.append(f"  one user         recsys recs --date {s.date} --user {s.sample_user} --out {s.recs_uri}")
    if s.cold is not None:
        lines.append(f"  new titles       {s.cold[1]} of {s.cold[0]} titles the model never saw recommended on {s.date} "
                     f"from their metadata (no retraining), to {s.cold[2]:,} users")
    lines.append(f"  MLflow store     {redact_uri(s.tracking)}")
    lines.append("  browse           make ui   (MLflow and Airflow UIs on 127.0.0.1, with the login)")
    lines.append(f"  full log         {log}")
    return lines


def collect_summary(settings: Settings, date: str) -> Summary:
    """The champion, its gate verdict and NDCG, and one user's list, through the public APIs (registry, recs)."""
    from pipeline.io import registry
    from pipeline.serving.recs import date_manifest, read_recommendations

    tracking = settings.tracking_uri
    version = registry.alias_version(settings.model_name, "champion", tracking)
    tags = registry.version_tags(settings.model_name, str(version), tracking) if version else {}
    run_id = tags.get("run_id")
    ndcg, experiment, report = None, None, None
    model = tags.get("model", "")
    twin = model.removesuffix("-pia")
    twin_ndcg = tags.get(f"compare.{twin}.test.ndcg_at_100")
    ablation = (tags.get("gate.ablation.pia", "?"), twin, float(twin_ndcg)) if model.endswith("-pia") and twin_ndcg else None
    if run_id:
        run = registry.client(tracking).get_run(run_id)
        ndcg, experiment = run.data.metrics.get("test.ndcg_at_100"), run.info.experiment_id
        report = _gate_report(run.info.artifact_uri)
    recs = read_recommendations(settings.recs_uri, date)
    sample: Any = None
    items: tuple[str, ...] = ()
    cold = None
    if recs.num_rows:
        sample = recs.column("user_id")[0].as_py()
        one = read_recommendations(settings.recs_uri, date, user_ids=[sample])  # the lookup a service would make
        items = tuple(str(i) for i in one.column("item_ids")[0].as_py()) if one.num_rows else ()
        m = date_manifest(settings.recs_uri, date)
        cold = (int(m.get("cold_items_scored") or 0), int(m.get("cold_items_shown") or 0), int(m.get("cold_users") or 0))
    return Summary(home=settings.home, model_name=settings.model_name, version=version,
                   verdict=tags.get("gate.verdict", "?"), ndcg=ndcg, run_id=run_id, experiment_id=experiment,
                   recs_uri=settings.recs_uri, date=date, users=recs.num_rows,
                   sample_user=None if sample is None else str(sample), sample_items=items, tracking=tracking,
                   gate_report=report, cold=cold if cold and cold[0] else None, ablation=ablation)


def _gate_report(artifact_uri: str | None) -> str | None:
    """The gate's report in a run's local artifacts (the HTML one when there is one), or None."""
    if not artifact_uri or not artifact_uri.startswith(("file:", "/")):
        return None
    from urllib.parse import unquote, urlparse

    folder = Path(unquote(urlparse(artifact_uri).path)) / "gate" / "enabled"
    for name in ("gate_report.html", "gate_report.md"):
        if (folder / name).is_file():
            return str(folder / name)
    return None


# -- the story ----------------------------------------------------------------------------------------------------

def tell(screen: Screen, steps: Sequence[Step], finish: Callable[[float], list[str]]) -> int:
    """Run the steps in order (stopping at the first failure), then print `finish(seconds)`: 0, or 1 on a failure."""
    t0 = time.perf_counter()
    for step in steps:
        try:
            screen.run(step)
        except StepFailed:
            screen.say(f"make run stopped at: {step.title}")
            return 1
    for line in finish(time.perf_counter() - t0):
        screen.say(line)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`make run`: synthetic events, the weekly DAG, the daily DAG, then where everything is."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--home", type=Path, default=Path(os.environ.get("RECSYS_HOME", REPO / "out" / "home")),
                   help="where everything goes (RECSYS_HOME)")
    p.add_argument("--users", type=int, default=3000, help="synthetic users")
    p.add_argument("--items", type=int, default=800, help="synthetic catalog size")
    p.add_argument("--days", type=int, default=28, help="days of synthetic events (= the training window)")
    p.add_argument("--start", default="2026-01-01", help="first day of the synthetic events")
    p.add_argument("--new-titles", type=int, default=5, help="titles in the day's catalogue without any click")
    p.add_argument("--date", default=None, help="the daily run's date (default: the day after the last day of events)")
    p.add_argument("--train-config", type=Path, default=REPO / "configs" / "embedded-train.yaml",
                   help="TrainJob YAML (RECSYS_TRAIN_CONFIG)")
    args = p.parse_args(argv)
    home = args.home.expanduser().resolve()
    (home / "logs").mkdir(parents=True, exist_ok=True)
    log = home / "logs" / LOG_NAME
    log.write_text("")  # one run's log: re-running replaces it, like everything else under the home
    start = parse_date(args.start)
    last_day = start + dt.timedelta(days=args.days - 1)
    # the daily run: the morning after the weekly training's last day, when the day's new titles have arrived
    date = parse_date(args.date).isoformat() if args.date else (last_day + dt.timedelta(days=1)).isoformat()

    recsys_env = {"RECSYS_HOME": str(home), "RECSYS_TRAIN_CONFIG": str(args.train_config.resolve()),
                  "RECSYS_WINDOW_DAYS": str(args.days), "RECSYS_SPARK_MASTER": "local[2]",
                  "RECSYS_TOP_N": "100", "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable,
                  # a failing task retries at once, not after the DAGs' production back-off of minutes
                  "AIRFLOW__CORE__MAX_TASK_RETRY_DELAY": "1"}
    os.environ.update(recsys_env)
    settings = Settings.from_env()
    airflow = str(Path(sys.executable).with_name("airflow"))
    out = terminal()
    screen = Screen(out, log, tty=is_tty(out))
    screen.say(f"make run: synthetic events → weekly DAG → daily DAG, under {home}")
    screen.say(f"  Airflow and job logs go to {log}")
    env: dict[str, str] = {}

    def synth(_: Progress) -> str:
        from pipeline.data.synth_events import SynthEventsJob

        ev = SynthEventsJob(users=args.users, items=args.items, days=args.days, start=start, out=settings.events_uri,
                            seed=0).run()
        return f"{ev.events:,} events"

    def catalogue(_: Progress) -> str:
        import pyarrow.parquet as pq

        from pipeline.data.items import ItemsIngestJob
        from pipeline.data.synth_events import SynthEventsJob, synth_catalog

        cfg = SynthEventsJob(users=args.users, items=args.items, days=args.days, start=start, out=settings.events_uri,
                             seed=0)
        # a catalogue published every day of the events (the weekly build joins its as-of date's, which @weekly
        # intervals put on a Saturday), then the daily date's, with the titles added since training
        src = home / "catalogue"
        src.mkdir(parents=True, exist_ok=True)
        pq.write_table(synth_catalog(cfg, 0), src / "items.parquet")
        pq.write_table(synth_catalog(cfg, args.new_titles), src / "items-new.parquet")
        daily = parse_date(date)
        days = {start + dt.timedelta(days=d) for d in range(args.days)} | {daily}
        for day in sorted(days):
            ItemsIngestJob(src=src / ("items-new.parquet" if day == daily else "items.parquet"), lake=settings.lake_uri,
                           date=day).run()
        return f"{args.items:,} titles with a genre; {args.new_titles} more on {date}"

    def migrate(progress: Progress) -> str:
        from pipeline.orchestration.dev.local_airflow import airflow_env

        env.update(airflow_env(home / "airflow", extra=recsys_env))
        run_logged([airflow, "db", "migrate"], env, log, progress)
        return ""

    # the weekly run whose data interval ends the day after the last event day: as-of = that last day
    weekly_logical = (last_day + dt.timedelta(days=1)).isoformat()
    steps = [
        Step(f"synthetic events: {args.users:,} users × {args.items:,} items × {args.days} days", synth),
        Step("catalogue: the day's items files (recsys ingest)", catalogue),
        Step("Airflow metadata DB (SQLite in RECSYS_HOME/airflow)", migrate),
        Step("weekly DAG: build matrix → train → gate → promote",
             lambda pr: run_logged([airflow, "dags", "test", "weekly_train", weekly_logical], env, log, pr), tasks=4,
             live=True),
        Step(f"daily DAG for {date}: champion → infer → publish",
             lambda pr: run_logged([airflow, "dags", "test", "daily_inference", date], env, log, pr), tasks=2, live=True),
    ]
    summary: list[Summary] = []

    def gather(_: Progress) -> str:
        summary.append(collect_summary(settings, date))
        return ""

    steps.append(Step("summary from the registry and the published table", gather))
    try:
        with output_to(log):
            return tell(screen, steps, lambda took: summary_lines(summary[0], log, took))
    except KeyboardInterrupt:
        screen.say(f"interrupted; log: {log}")
        return 130
    finally:
        out.close()


if __name__ == "__main__":
    sys.exit(main())
