"""pipeline.orchestration.dev.story (`make run`): one screen of step lines and a summary; the subprocesses' and
this process's own output go to the log file; a failure shows the log's path and its last lines.

The fast tests drive the story's machinery with small real subprocesses (a Python child printing like
`airflow dags test`) instead of Airflow; the slow one runs the real story end to end on a tiny data set."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.orchestration.dev import story
from pipeline.orchestration.dev.story import (
    MAX_LINES,
    TAIL_LINES,
    Progress,
    Screen,
    Step,
    StepFailed,
    Summary,
    output_to,
    run_logged,
    summary_lines,
    tell,
)

SUMMARY = Summary(home=Path("/h"), model_name="recsys-multivae-pia", version="3", verdict="passed", ndcg=0.31234,
                  run_id="0123456789abcdef0123", experiment_id="1", recs_uri="/h/lake", date="2026-01-28", users=3099,
                  sample_user="17", sample_items=tuple(str(i) for i in range(100, 120)), tracking="sqlite:////h/mlflow.db",
                  gate_report="/h/artifacts/1/r/artifacts/gate/enabled/gate_report.html", cold=(5, 3, 1234),
                  ablation=("warn", "multivae", 0.3301))


def _child(body: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(body)]


NOISY_DAG = _child("""
    import sys
    for t in ("build_matrix", "train", "gate_and_promote"):
        print(f"2026-01-01T00:00:00Z [info ] [DAG TEST] starting task_id={t} map_index=-1 [airflow]")
        for i in range(200):
            print(f"noise {t} {i:03d}", file=sys.stderr if i % 2 else sys.stdout)
        if t == "train":
            print("2026-01-01 [info ] epoch 7/30 anchor=1 loss=2 val_ndcg@100=0.3 [model.train]")
        print(f"2026-01-01T00:00:00Z [info ] [DAG TEST] end task task_id={t} map_index=-1 [airflow]")
""")


def test_a_run_fits_one_screen_and_the_noise_goes_to_the_log(tmp_path: Path) -> None:
    log = tmp_path / "make-run.log"
    out = io.StringIO()
    screen = Screen(out, log, tty=False)
    steps = [Step("in-process step", lambda _: "42 things"),
             Step("weekly DAG", lambda pr: run_logged(NOISY_DAG, os.environ, log, pr, poll=0.05), tasks=3, live=True),
             Step("daily DAG", lambda pr: run_logged(NOISY_DAG, os.environ, log, pr, poll=0.05), tasks=3, live=True)]
    assert tell(screen, steps, lambda took: summary_lines(SUMMARY, log, took)) == 0
    text = out.getvalue()
    lines = text.splitlines()
    assert len(lines) <= MAX_LINES and lines == screen.lines
    assert "noise" not in text and "\x1b" not in text and "\r" not in text  # plain lines off a terminal
    assert sum(line.startswith("noise ") for line in log.read_text().splitlines()) == 2 * 600
    assert any(line.startswith("  ✓ in-process step") and line.endswith("42 things") for line in lines)
    assert any(line.startswith("  ✓ weekly DAG") and line.endswith("3 tasks") for line in lines)
    assert "recsys-multivae-pia version 3 is champion (gate passed, test NDCG@100 0.3123)" in text
    assert "gate report      /h/artifacts/1/r/artifacts/gate/enabled/gate_report.html" in text
    assert "in `make ui`: http://127.0.0.1:5000/#/experiments/1/runs/0123456789abcdef0123" in text
    assert "/h/lake (3,099 users for 2026-01-28)" in text
    assert "user 17's top 10: 100, 101, 102, 103, 104, 105, 106, 107, 108, 109, …" in text
    assert "recsys recs --date 2026-01-28 --user 17 --out /h/lake" in text
    assert ("PIA ablation     warn: multivae without PIA, trained beside it, test NDCG@100 0.3301 (the gate report "
            "says why)") in text
    assert ("new titles       3 of 5 titles the model never saw recommended on 2026-01-28 from their metadata "
            "(no retraining), to 1,234 users") in text
    assert "make ui" in text and str(log) in text


def test_a_failing_step_stops_the_story_with_the_log_path_and_its_last_lines(tmp_path: Path) -> None:
    log = tmp_path / "make-run.log"
    out = io.StringIO()
    failing = _child("""
        import sys
        for i in range(1, 61):
            print(f"line {i:03d}")
        sys.exit(3)
    """)
    ran: list[str] = []
    steps = [Step("first", lambda _: ran.append("first") or ""),
             Step("weekly DAG", lambda pr: run_logged(failing, os.environ, log, pr, poll=0.05), tasks=4, live=True),
             Step("never", lambda _: ran.append("never") or "")]
    assert tell(Screen(out, log), steps, lambda took: ["summary"]) == 1
    assert ran == ["first"]
    text = out.getvalue()
    lines = text.splitlines()
    assert len(lines) <= MAX_LINES and "summary" not in lines
    assert any(line.startswith("  ✗ weekly DAG") for line in lines)
    assert "exited with 3" in text and f"log: {log}; its last {TAIL_LINES} lines:" in text
    shown = [line for line in lines if line.startswith("    | ")]
    assert shown == [f"    | line {i:03d}" for i in range(61 - TAIL_LINES, 61)]
    assert lines[-1] == "make run stopped at: weekly DAG"


def test_an_exception_in_a_step_is_one_line_and_its_traceback_goes_to_stderr(tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "make-run.log"
    log.write_text("earlier\n")
    out = io.StringIO()

    def boom(_: Progress) -> str:
        raise ValueError("no champion")

    with pytest.raises(StepFailed, match="ValueError: no champion"):
        Screen(out, log).run(Step("summary", boom))
    assert "    ValueError: no champion" in out.getvalue() and "Traceback" not in out.getvalue()
    assert "Traceback" in capsys.readouterr().err  # in `make run`, stderr is the log (output_to)


def test_progress_follows_the_task_markers_and_the_epochs(tmp_path: Path) -> None:
    seen: list[tuple[int, str]] = []

    class Bar:  # what Progress drives on a terminal (tqdm's n, postfix, refresh)
        n = 0

        def set_postfix_str(self, s: str, refresh: bool = True) -> None:
            seen.append((self.n, s))

        def refresh(self) -> None:
            pass

    assert run_logged(NOISY_DAG, os.environ, tmp_path / "log", Progress(Bar()), poll=0.01) == "3 tasks"
    assert seen[-1] == (3, "gate_and_promote")
    assert (1, "train epoch 7/30") in seen  # during `train`: one task ended, the epoch line shown


def test_a_terminal_gets_a_bar_and_still_one_line_per_step(tmp_path: Path) -> None:
    out = io.StringIO()
    log = tmp_path / "log"
    steps = [Step("weekly DAG", lambda pr: run_logged(NOISY_DAG, os.environ, log, pr, poll=0.05), tasks=3, live=True)]
    assert tell(Screen(out, log, tty=True), steps, lambda took: []) == 0
    assert "tasks" in out.getvalue()  # the bar was drawn ...
    final = [line for line in out.getvalue().replace("\r", "\n").splitlines() if line.startswith("  ✓")]
    assert len(final) == 1 and final[0].endswith("3 tasks")  # ... and replaced by the step's line


def test_output_to_sends_this_process_and_its_children_to_the_log(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "log"
    with output_to(log):
        print("from python")
        print("to stderr", file=sys.stderr)
        os.write(1, b"from fd 1\n")
        subprocess.run([sys.executable, "-c", "print('from a child')"], check=True)
    print("after")
    captured = capfd.readouterr()
    assert captured.out == "after\n" and captured.err == ""
    assert log.read_text().splitlines() == ["from python", "to stderr", "from fd 1", "from a child"]


def test_summary_without_a_champion_or_recommendations() -> None:
    s = Summary(home=Path("/h"), model_name="m", version=None, verdict="?", ndcg=None, run_id=None, experiment_id=None,
                recs_uri="/h/lake", date="2026-01-28", users=0, sample_user=None, sample_items=(),
                tracking="sqlite:////h/mlflow.db")
    text = "\n".join(summary_lines(s, Path("/h/logs/make-run.log"), 61))
    assert "Done in 1 min 01 s" in text and "no champion for m (gate ?)" in text
    assert "gate report" not in text and "top 10" not in text and "/h/logs/make-run.log" in text
    assert "new titles" not in text and "ablation" not in text


def test_durations_read_like_a_person_would_say_them() -> None:
    assert [story.duration(s) for s in (0.42, 9.94, 42.4, 60, 200.6)] == ["0.4 s", "9.9 s", "42 s", "1 min 00 s", "3 min 21 s"]


TINY_TRAIN = "epochs: 2\npatience: 2\nbatch_size: 100\ncompare_base: false\nbaselines: false\ndiagnose: false\n" \
             "vae:\n  hidden_dims: [32]\n  latent_dim: 16\n"


@pytest.mark.slow
def test_make_run_end_to_end_fits_one_screen(tmp_path: Path) -> None:
    """The real story (Airflow's `dags test` for both DAGs) on 300 users x 100 items x 14 days, in a subprocess as
    `make run` runs it; its whole terminal output is one screen and ends with the summary."""
    train = tmp_path / "train.yaml"
    train.write_text(TINY_TRAIN)
    gates = tmp_path / "gates.yaml"
    gates.write_text("allow_missing_baselines: true\n")  # a 2-epoch model and no baselines: floors, coverage, sanity
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RECSYS_", "MLFLOW_", "AIRFLOW"))}
    env |= {"RECSYS_GATE_CONFIG": str(gates), "RECSYS_DEVICE": "cpu"}
    p = subprocess.run([sys.executable, "-m", "pipeline.orchestration.dev.story", "--home", str(home), "--users", "300",
                        "--items", "100", "--days", "14", "--start", "2026-01-04", "--train-config", str(train)],
                       env=env, capture_output=True, text=True, timeout=900, check=False)
    lines = p.stdout.splitlines()
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    assert p.stderr == "" and len(lines) <= MAX_LINES, p.stdout
    assert "\x1b" not in p.stdout and "[DAG TEST]" not in p.stdout
    assert sum(line.startswith("  ✓") for line in lines) == 6
    shown = re.search(r"new titles +(\d+) of (\d+) titles the model never saw recommended on 2026-01-18 from their "
                      r"metadata \(no retraining\), to ([\d,]+) users", p.stdout)
    assert shown, p.stdout
    # the 5 added on the daily date, plus catalogue titles without a click before the weekly as-of
    assert int(shown[2]) >= 5 and int(shown[1]) >= 1 and int(shown[3].replace(",", "")) >= 1  # the cold head at work
    assert any("weekly DAG" in line and line.endswith("4 tasks") for line in lines)
    assert any("daily DAG for 2026-01-18" in line and line.endswith("2 tasks") for line in lines)
    assert "version 1 is champion (gate passed" in p.stdout and "'s top 10: " in p.stdout
    report = next(line for line in lines if line.startswith("  gate report")).split()[-1]
    assert Path(report).is_file() and "/gate/enabled/gate_report." in report
    log = home / "logs" / "make-run.log"
    assert f"full log         {log}" in p.stdout and "[DAG TEST] end task task_id=infer" in log.read_text()
