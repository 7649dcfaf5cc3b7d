"""pipeline.serving.restore: a date's history, restoring a date's files as of an earlier table version (a new commit,
other dates untouched), vacuuming with a retention; bad input is one clear DataError and commits nothing."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.errors import DataError
from pipeline.io import delta_table, lake
from pipeline.io.publish import PartitionWriter
from pipeline.serving.recs import read_recommendations
from pipeline.serving.restore import HistoryJob, RestoreJob, VacuumJob

D, E = dt.date(2024, 5, 1), dt.date(2024, 5, 2)


def publish(root: Path | str, day: dt.date, users: list[int], model_version: str) -> PartitionWriter:
    w = PartitionWriter(lake.resolve(f"{root}/recommendations/dt={day}"))
    n = len(users)
    w.write_part(pa.table({"user_id": pa.array(users, pa.int64()), "model_version": pa.array([model_version] * n)}),
                 user_min=min(users), user_max=max(users))
    w.commit({"model_version": model_version, "date": day.isoformat()})
    return w


def rows(root: Path | str, day: dt.date) -> list[tuple[int, str]]:
    t = read_recommendations(str(root), day)
    return sorted(zip(t["user_id"].to_pylist(), t["model_version"].to_pylist(), strict=True))


def version(root: Path | str) -> int:
    table = delta_table.open_table(lake.resolve(f"{root}/recommendations"))
    assert table is not None
    return table.version()


@pytest.fixture
def lake_root(tmp_path: Path) -> Path:
    publish(tmp_path, D, [1, 2], "a")  # v0
    publish(tmp_path, E, [5], "e")  # v1
    publish(tmp_path, D, [3], "b")  # v2: a bad model slipped through
    return tmp_path


def test_restore_the_version_before_the_dates_last_change_then_a_chosen_one(lake_root: Path) -> None:
    r = RestoreJob(out=str(lake_root), date=D).run()
    assert (r.version, r.restored_version, r.model_version, r.rows) == (3, 1, "a", 2)
    assert rows(lake_root, D) == [(1, "a"), (2, "a")] and rows(lake_root, E) == [(5, "e")]  # other dates untouched
    h = HistoryJob(out=str(lake_root), date=D).run()
    assert [(c.version, c.operation, c.model_version, c.restored_version, c.live) for c in h.commits] == [
        (3, "restore", "a", 1, True), (2, "publish", "b", None, False), (0, "publish", "a", None, False)]
    assert h.version == 3 and h.commits[1].rows == 1 and h.commits[1].run.startswith("run-")
    assert h.commits[0].timestamp.tzinfo is not None
    # back to the bad model's files, by version; then the default undoes that restore
    assert RestoreJob(out=str(lake_root), date=D, version=2).run().version == 4
    assert rows(lake_root, D) == [(3, "b")]
    RestoreJob(out=str(lake_root), date=D).run()
    assert rows(lake_root, D) == [(1, "a"), (2, "a")] and version(lake_root) == 5
    # any Delta reader sees the restored files only
    table = delta_table.open_table(lake.resolve(f"{lake_root}/recommendations"))
    assert table is not None
    assert sorted(table.to_pyarrow_table(filters=[("dt", "=", D)])["user_id"].to_pylist()) == [1, 2]


@pytest.mark.parametrize("kwargs, message", [
    ({"version": 99}, r"has no version 99 \(versions 0\.\.2\)\. Fix: pick a version from `recsys history"),
    ({"date": E, "version": 0}, r"version 0 of the recommendations table holds no files for 2024-05-02\. Fix: pick a "
                                r"version that does"),
    ({"date": E}, r"2024-05-02 was published in the table's first version|version 0 of the recommendations table holds "
                  r"no files for 2024-05-02"),
    ({"version": 2}, r"2024-05-01 already holds the files of version 2\. Fix: nothing to restore"),
    ({"date": dt.date(2024, 4, 1)}, r"no commit of 2024-04-01 in the recommendations table .*Fix: check --date"),
    ({"date": dt.date.today() + dt.timedelta(days=2)}, r"is in the future: no recommendations can have been published"),
])
def test_bad_restores_are_clear_and_commit_nothing(lake_root: Path, kwargs: dict, message: str) -> None:
    before = version(lake_root)
    with pytest.raises(DataError, match=message):
        RestoreJob(out=str(lake_root), **{"date": D, **kwargs}).run()
    assert version(lake_root) == before and rows(lake_root, D) == [(3, "b")]


def test_no_table_and_negative_versions(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no recommendations table at .*Fix: check --out"):
        RestoreJob(out=str(tmp_path), date=D).run()
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        RestoreJob(out=str(tmp_path), date=D, version=-1)
    with pytest.raises(DataError, match="is in the future"):
        HistoryJob(out=str(tmp_path), date=dt.date.today() + dt.timedelta(days=1)).run()


def test_vacuum_keeps_what_restore_needs_until_the_retention(lake_root: Path) -> None:
    crashed = PartitionWriter(lake.resolve(f"{lake_root}/recommendations/dt={D}"))  # staged, never committed
    crashed.write_part(pa.table({"user_id": pa.array([9], pa.int64()), "model_version": pa.array(["x"])}))
    assert VacuumJob(out=str(lake_root)).run().files == 0  # within a week: nothing goes
    dry = VacuumJob(out=str(lake_root), retain_hours=0, dry_run=True).run()
    assert (dry.files, dry.run_folders) == (2, 2)  # v0's file of D (replaced), the crashed run's part; their folders
    assert crashed.run_dir.exists()
    assert RestoreJob(out=str(lake_root), date=D, version=0).run().rows == 2  # still restorable: D is back to "a"
    publish(lake_root, D, [3], "b")  # and replaced again
    done = VacuumJob(out=str(lake_root), retain_hours=0).run()
    assert (done.files, done.run_folders) == (3, 3)  # the two replaced runs' parts and the crashed one; their folders
    assert not crashed.run_dir.exists()
    kept = sorted(p.name for p in (lake_root / "recommendations" / f"dt={D}").iterdir())
    assert len(kept) == 1 and sorted(p.name for p in (lake_root / "recommendations" / f"dt={D}" / kept[0]).iterdir()) == [
        "_manifest.json", "part-00000.parquet"]  # the live run keeps its manifest (the readers' checksums)
    assert rows(lake_root, D) == [(3, "b")] and rows(lake_root, E) == [(5, "e")]  # live files untouched
    before = version(lake_root)
    with pytest.raises(DataError, match=r"a file of 2024-05-01 in version 0, is gone \(vacuumed\?\).*Fix: restore a newer"):
        RestoreJob(out=str(lake_root), date=D, version=0).run()
    assert version(lake_root) == before


def test_cli_history_restore_vacuum(lake_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.cli.main import main

    out = str(lake_root)
    assert main(["history", "--out", out, "--date", D.isoformat()]) == 0
    text = capsys.readouterr().out
    assert "* v2" in text and "publish" in text and "model version b" in text and "  v0" in text
    assert main(["restore", "--out", out, "--date", D.isoformat()]) == 0
    assert "restored 2024-05-01 to its files of version 1 (2 rows, model version a" in capsys.readouterr().out
    assert main(["history", "--out", out, "--date", D.isoformat(), "--json"]) == 0
    assert '"operation":"restore"' in capsys.readouterr().out
    assert main(["vacuum", "--out", out, "--retain-hours", "0", "--dry-run"]) == 0
    assert "would delete 1 files older than 0 h" in capsys.readouterr().out
    for argv, message in ((["restore", "--out", out, "--date", "2024-02-30"], "not a calendar date"),
                          (["restore", "--out", out, "--date", "yesterday"], "invalid date"),
                          (["restore", "--out", out, "--date", D.isoformat(), "--table-version", "42"], "has no version 42"),
                          (["history", "--out", out, "--date", "2999-01-01"], "is in the future")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err and "Fix:" in err
    assert version(lake_root) == 3 and rows(lake_root, D) == [(1, "a"), (2, "a")]


def test_old_dates_are_dropped_through_the_table_and_restorable_within_the_retention(lake_root: Path) -> None:
    """The table's own date retention (an object-store expiry rule would delete the log): one commit drops every
    date before the cut; the files stay for a vacuum, so a dropped date can still be restored."""
    assert VacuumJob(out=str(lake_root), drop_before=E, dry_run=True).run().dropped_dates == [D]
    assert version(lake_root) == 2  # a dry run commits nothing
    r = VacuumJob(out=str(lake_root), drop_before=E).run()
    assert r.dropped_dates == [D] and r.files == 0 and version(lake_root) == 3  # one commit, nothing deleted yet
    with pytest.raises(DataError, match="no committed recommendations for 2024-05-01"):
        read_recommendations(str(lake_root), D)
    assert rows(lake_root, E) == [(5, "e")]
    assert [(c.version, c.operation) for c in HistoryJob(out=str(lake_root), date=D).run().commits][:1] == [(3, "drop")]
    assert RestoreJob(out=str(lake_root), date=D).run().restored_version == 2  # undo the drop
    assert rows(lake_root, D) == [(3, "b")]
    assert VacuumJob(out=str(lake_root), drop_before=D).run().dropped_dates == []  # nothing older: no commit
    assert version(lake_root) == 4
