"""Spill folders of killed runs: a run holds a lock on its `recsys-infer-*` folder under the temp dir while it lives;
each run first removes the folders no live run holds (SIGKILL leaves them behind), and never a live run's."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from infer_support import events_table, run_infer, tiny_bundle, write_events

from pipeline.serving import spill
from pipeline.serving.job import InferJob

REPO = Path(__file__).resolve().parents[3]
HOLD = """
import sys, time
from pipeline.serving.spill import spill_dir
with spill_dir() as d:
    (d / "shard-00000.arrow").write_bytes(b"x" * 1000)
    print(d, flush=True)
    time.sleep(120)
"""


@pytest.fixture
def tmpdir_(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private temp dir for this test and the processes it starts (never the machine's /tmp)."""
    d = tmp_path / "tmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


def start_holder(tmpdir: Path) -> tuple[subprocess.Popen[str], Path]:
    env = {**os.environ, "TMPDIR": str(tmpdir), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", HOLD], env=env, cwd=REPO, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()  # type: ignore[union-attr]
    assert line, "the holder did not start"
    return proc, Path(line)


def aged(d: Path, seconds: float) -> Path:
    t = time.time() - seconds
    os.utime(d, (t, t))
    return d


def test_a_killed_runs_folder_is_removed_and_a_live_ones_is_kept(tmpdir_: Path) -> None:
    proc, held = start_holder(tmpdir_)
    try:
        assert (held / spill.OWNER).read_text().strip() == str(proc.pid)  # for people; the lock decides
        aged(held, 10 * spill.STALE_SECONDS)  # age alone never removes a held folder
        assert spill.remove_stale_spill_dirs() == [] and (held / "shard-00000.arrow").exists()
        with spill.spill_dir() as mine:  # another run starting meanwhile leaves it alone too
            assert held.exists() and mine.exists() and mine.parent == tmpdir_
        assert not mine.exists()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert held.exists()  # a killed run cannot clean up after itself
    assert spill.remove_stale_spill_dirs() == [held] and not held.exists()


def test_folders_without_an_owner_go_only_when_old(tmpdir_: Path) -> None:
    old = aged(Path(tempfile.mkdtemp(prefix="recsys-infer-", dir=tmpdir_)), spill.STALE_SECONDS + 60)
    spark_old = aged(Path(tempfile.mkdtemp(prefix="recsys-infer-spark-", dir=tmpdir_)), spill.STALE_SECONDS + 60)
    young = Path(tempfile.mkdtemp(prefix="recsys-infer-", dir=tmpdir_))  # maybe a run creating its owner file
    other = aged(Path(tempfile.mkdtemp(prefix="someone-else-", dir=tmpdir_)), spill.STALE_SECONDS + 60)
    plain = tmpdir_ / "recsys-infer-a-file"
    plain.write_text("not a folder")
    assert sorted(spill.remove_stale_spill_dirs()) == sorted([old, spark_old])
    assert young.exists() and other.exists() and plain.exists()


def test_inference_cleans_up_stale_folders_at_start(tmpdir_: Path, tmp_path: Path) -> None:
    proc, dead = start_holder(tmpdir_)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    live, live_dir = start_holder(tmpdir_)
    try:
        events = write_events(events_table(n_users=20), str(tmp_path / "events"))
        job = InferJob(date=dt.date(2024, 5, 3), events=events, out=str(tmp_path / "out"), device="cpu",  # type: ignore[arg-type]
                       top_n=5, progress=False)
        run_infer(job, tiny_bundle(), "1")
        assert not dead.exists() and live_dir.exists()
        left = sorted(p.name for p in tmpdir_.glob(spill.SPILL_PREFIX + "*"))
        assert left == [live_dir.name]  # the run removed its own folder too
    finally:
        os.kill(live.pid, signal.SIGKILL)
        live.wait()
