"""Operating the recommendations table (pipeline.serving.layout): a date's history, restoring a date, vacuuming.

    HistoryJob(out, date).run()           the table versions that changed the date: when, which run, which model
    RestoreJob(out, date[, version]).run() the date's files as of `version` committed again (a new version; other
                                           dates untouched); default: the version before the date's latest change
    VacuumJob(out, retain_hours[, drop_before]).run()   drop the dates before `drop_before` (one commit; the
                                           table's own date retention), then delete the files no version newer
                                           than the retention needs

A re-publish or a restore only marks the date's previous files removed in the Delta log; they stay on disk, so any
earlier version of a date can be restored until a vacuum deletes them. The vacuum deletes files that were removed
more than `retain_hours` ago (Delta's vacuum), then the run folders left with only their `_manifest.json`, and
the folders of runs that no commit names (crashed or refused runs) whose files are all older than the retention.
Keep the retention longer than the longest run (a run still staging its parts would lose them) and as long as you
want to be able to restore (default 168 h, Delta's default `delta.deletedFileRetentionDuration`). Not Delta's
"full" vacuum: it deletes every file the log does not name, the runs' `_manifest.json` included.

A date's history knows this project's commits (their metadata names the date, `pipeline.io.delta_table.FACTS`);
commits made by other writers are not attributed to a date.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
from pydantic import Field

from pipeline.errors import DataError
from pipeline.io import delta_table, lake
from pipeline.io.dates import parse_date
from pipeline.io.publish import MANIFEST, RUN_PREFIX
from pipeline.job import Job, JobResult
from pipeline.serving import layout

DEFAULT_RETAIN_HOURS = 168.0  # Delta's default delta.deletedFileRetentionDuration (one week)


def _past_date(v: object) -> dt.date:
    day = parse_date(v)  # type: ignore[arg-type]
    if day > dt.datetime.now(dt.UTC).date():
        raise DataError(f"date {day} is in the future: no recommendations can have been published for it",
                        "pass a date that has been published (`recsys history --date`)")
    return day


class DateCommit(JobResult):
    """One table version that changed a date."""

    version: int
    timestamp: dt.datetime  # UTC, when the commit was written
    operation: str  # publish | restore
    run: str  # the run folder whose files the date then held
    model_version: str
    rows: int | None
    restored_version: int | None = None  # for a restore: the version whose files it committed again
    live: bool  # the date's newest commit: its files are the date's files now


class HistoryResult(JobResult):
    date: dt.date
    table_uri: str
    version: int  # the table's latest version
    commits: list[DateCommit]  # newest first


class RestoreResult(JobResult):
    date: dt.date
    table_uri: str
    version: int  # the new commit
    restored_version: int  # whose files of the date it committed again
    run: str
    model_version: str
    rows: int


class VacuumResult(JobResult):
    table_uri: str
    retain_hours: float
    dry_run: bool
    files: int  # data files deleted (or, dry run: that would be)
    run_folders: int  # run folders removed with them (emptied but for their manifest)
    dropped_dates: list[dt.date] = Field(default_factory=list)  # dates removed from the table first (drop_before)


def _table(out: str, version: int | None = None) -> tuple[lake.Location, Any]:
    root = layout.recommendations_root(out)
    table = delta_table.open_table(root, version)
    if table is None:
        raise DataError(f"no recommendations table at {root.uri}", "check --out (the lake root given to `recsys infer`)")
    return root, table


def _date_commits(table: Any, date: dt.date) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(history entry, facts) of this project's commits of `date`, newest first."""
    out = []
    for commit in table.history():
        facts = delta_table.commit_facts(commit)
        if facts is not None and (facts.get(delta_table.PARTITION) == date.isoformat()
                                  or date.isoformat() in (facts.get("dates") or [])):  # a drop of old dates
            out.append((commit, facts))
    return sorted(out, key=lambda cf: int(cf[0]["version"]), reverse=True)


def _files_at(root: lake.Location, version: int, date: dt.date) -> list[tuple[str, int]]:
    table = delta_table.open_table(root, version)
    assert table is not None
    return delta_table.live_files_of(delta_table.live_files(table), date)


class HistoryJob(Job):
    """The versions of the recommendations table under `out` that changed `date`."""

    out: str
    date: dt.date

    def run(self) -> HistoryResult:
        _past_date(self.date)
        root, table = _table(self.out)
        commits = []
        for i, (commit, facts) in enumerate(_date_commits(table, self.date)):
            version = int(commit["version"])
            live = i == 0  # the newest commit of the date set its files (other writers' commits aside)
            rows = facts.get("rows")
            restored = facts.get("restored_version")
            commits.append(DateCommit(
                version=version, timestamp=dt.datetime.fromtimestamp(int(commit.get("timestamp", 0)) / 1000, dt.UTC),
                operation=str(facts.get("operation", "publish")), run=str(facts.get("run", "")),
                model_version=str(facts.get("model_version", "")), rows=rows if isinstance(rows, int) else None,
                restored_version=restored if isinstance(restored, int) else None, live=live))
        return HistoryResult(date=self.date, table_uri=root.uri, version=table.version(), commits=commits)


class RestoreJob(Job):
    """Commit `date`'s files as of table `version` again (None: the version before the latest commit that changed
    the date). A new commit, conflict-checked like a publish; other dates are untouched."""

    out: str
    date: dt.date
    version: int | None = Field(None, ge=0)

    def run(self) -> RestoreResult:
        _past_date(self.date)
        root, table = _table(self.out)
        latest = table.version()
        target = self.version
        if target is None:
            commits = _date_commits(table, self.date)
            if not commits:
                raise DataError(f"no commit of {self.date} in the recommendations table at {root.uri}",
                                "check --date (`recsys history --date`), or pass --table-version")
            target = int(commits[0][0]["version"]) - 1
            if target < 0:
                raise DataError(f"{self.date} was published in the table's first version: there is no earlier version",
                                "nothing to restore; re-run inference for the date instead")
        elif target > latest:
            raise DataError(f"the recommendations table at {root.uri} has no version {target} (versions 0..{latest})",
                            "pick a version from `recsys history --date`")
        files = _files_at(root, target, self.date)
        if not files:
            raise DataError(f"version {target} of the recommendations table holds no files for {self.date}",
                            "pick a version that does (`recsys history --date`)")
        now = delta_table.live_files_of(delta_table.live_files(table), self.date)
        if set(now) == set(files):
            raise DataError(f"{self.date} already holds the files of version {target}", "nothing to restore")
        for path, size in files:
            loc = root.join(path)
            info = loc.fs.get_file_info(loc.path)
            if info.type != pafs.FileType.File or info.size != size:
                raise DataError(f"{loc.uri}, a file of {self.date} in version {target}, is gone (vacuumed?) or changed",
                                "restore a newer version, or re-run inference for the date")
        folders = sorted({p.rpartition("/")[0] for p, _ in files})
        manifests = {folder: _manifest(root, folder, self.date, target) for folder in folders}  # the readers need them
        data = []
        for path, size in files:
            folder, _, name = path.rpartition("/")
            entry = next((f for f in manifests[folder]["files"] if isinstance(f, dict) and f.get("path") == name), {})
            data.append(delta_table.DataFile(path, size, int(entry.get("rows", 0)), entry.get("user_min"),
                                             entry.get("user_max")))
        schema = pa.schema([f for f in pa.schema(table.schema().to_arrow()) if f.name != delta_table.PARTITION])
        first = manifests[folders[0]]
        rows = sum(d.rows for d in data)
        facts = {"operation": "restore", "restored_version": target, "run": ",".join(folders),
                 "model_version": str(first.get("model_version", "")), "rows": rows, "n_files": len(data)}
        version = delta_table.commit_date(root, self.date, data, schema, facts)
        return RestoreResult(date=self.date, table_uri=root.uri, version=version, restored_version=target,
                             run=facts["run"], model_version=facts["model_version"], rows=rows)


def _manifest(root: lake.Location, folder: str, date: dt.date, version: int) -> dict[str, Any]:
    loc = root.join(folder, MANIFEST)
    try:
        parsed = json.loads(loc.read_bytes())
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"{loc.uri}, the manifest of {date}'s files in version {version}, is missing or unreadable",
                        "restore another version, or re-run inference for the date") from e
    if not isinstance(parsed, dict) or not isinstance(parsed.get("files"), list):
        raise DataError(f"{loc.uri}, the manifest of {date}'s files in version {version}, lists no files",
                        "restore another version, or re-run inference for the date")
    return parsed


class VacuumJob(Job):
    """Delete what no version within the retention needs (module doc); `dry_run` only counts."""

    out: str
    retain_hours: float = Field(DEFAULT_RETAIN_HOURS, ge=0)
    dry_run: bool = False
    drop_before: dt.date | None = None  # first drop the dates before this one (a commit; restorable within retention)

    def run(self) -> VacuumResult:
        root, table = _table(self.out)
        dropped: list[dt.date] = []
        if self.drop_before is not None:
            if self.dry_run:
                files = delta_table.live_files(table)
                dropped = sorted({d for d in files["date"].to_pylist() if d < self.drop_before})
            else:
                _, dropped = delta_table.drop_dates_before(root, self.drop_before, {"run": ""})
                table.update_incremental()
        # Delta's own vacuum, not "full": it deletes the files commits removed before the retention. (A full vacuum
        # would also delete every file the log does not name: the runs' _manifest.json included.)
        deleted = table.vacuum(retention_hours=int(self.retain_hours), dry_run=self.dry_run,
                               enforce_retention_duration=self.retain_hours >= DEFAULT_RETAIN_HOURS)
        # a file removed twice (published, restored, replaced again) is listed twice, once by its absolute path
        prefixes = tuple(f"{p.rstrip('/')}/" for p in (root.uri, root.path, delta_table.table_uri(root), f"file://{root.path}"))
        gone = {next((d[len(p):] for p in prefixes if d.startswith(p)), d) for d in deleted}
        files, folders = _remove_unreferenced_runs(root, table, self.retain_hours, self.dry_run, gone)
        return VacuumResult(table_uri=root.uri, retain_hours=self.retain_hours, dry_run=self.dry_run,
                            files=len(gone) + files, run_folders=folders, dropped_dates=dropped)


def _remove_unreferenced_runs(root: lake.Location, table: Any, retain_hours: float, dry_run: bool,
                              vacuumed: set[str]) -> tuple[int, int]:
    """Remove run folders no commit needs: those whose parts the vacuum deleted (only the manifest is left), and
    those of runs that never committed (crashed, refused, or a store failure) whose files are all older than the
    retention (a younger one may be a run still staging). Returns (part files deleted, folders removed)."""
    referenced: set[str] = set()
    for commit in table.history():
        facts = delta_table.commit_facts(commit)
        if facts is not None:
            referenced.update(str(facts.get("run", "")).split(","))
    live = {p.rpartition("/")[0] for p in delta_table.live_files(table)["path"].to_pylist()}
    cutoff = time.time() - retain_hours * 3600
    files = folders = 0
    for part in root.list():
        if not part.startswith(f"{delta_table.PARTITION}="):
            continue
        for run in root.join(part).list():
            folder = root.join(part, run)
            if not run.startswith(RUN_PREFIX) or f"{part}/{run}" in live:
                continue
            parts = [n for n in folder.list() if n.startswith("part-") and f"{part}/{run}/{n}" not in vacuumed]
            if run in referenced and parts:
                continue  # a replaced run, still restorable
            if run not in referenced:
                infos = folder.fs.get_file_info(pafs.FileSelector(folder.path, recursive=True))
                if any(i.mtime is not None and i.mtime.timestamp() > cutoff for i in infos):
                    continue  # maybe a run still staging
            files += 0 if run in referenced else len(parts)
            folders += 1
            if not dry_run:
                folder.delete()
    return files, folders
