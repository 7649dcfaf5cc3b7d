"""The rule for a writer that replaces a whole output folder (`recsys synth`, `recsys ingest`): it may only ever
replace what it wrote itself.

A target may be replaced when it is absent, empty, or carries the writer's marker file (``_RECSYS_EVENTS.json``,
say, naming the writer), which the writer puts there last, after a successful write. Refused, with a DataError
naming the path and the fix, before anything is written:

- a non-empty target without the marker, or with another writer's marker (someone's data, not ours);
- a target that is a file, a filesystem root or mount point, the home directory or a folder above it;
- an S3 bucket root (``s3://bucket``);
- a target that contains a source of the writer, or lies inside one.

The new output is written to a sibling temporary folder (``.<name>.tmp-<hex>``, which dataset readers skip) and
swapped in only when complete, so a failure while writing leaves the previous content as it was. Locally the swap
is two renames. S3 has no rename: the old objects (ours) are deleted and the new ones copied in, the marker last;
a failure there keeps the marker, so a re-run of the same writer replaces the partial folder.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from pipeline.errors import DataError
from pipeline.io.lake import Location, resolve

logger = logging.getLogger(__name__)

EVENTS_MARKER = "_RECSYS_EVENTS.json"
_REFUSE_FIX = "pick a new or empty folder for --out, or remove {path} yourself if its content can go"
_SUBFOLDER_FIX = "pass a new sub-folder for --out, e.g. {path}/events"


@dataclass
class Staged:
    """Where the writer writes (an empty sibling of the target), and what its marker will record."""

    location: Location
    details: dict[str, Any] = field(default_factory=dict)


def _is_local(loc: Location) -> bool:
    return isinstance(loc.fs, pafs.LocalFileSystem)


def _refuse(problem: str, path: str) -> DataError:
    return DataError(problem, _REFUSE_FIX.format(path=path))


def _home() -> Path | None:
    try:
        return Path.home().resolve()
    except (RuntimeError, KeyError, OSError):  # no HOME and no passwd entry
        return None


def _check_local_place(path: Path) -> None:
    fix = _SUBFOLDER_FIX.format(path=str(path).rstrip("/"))
    if path == Path(path.anchor):
        raise DataError(f"--out {path} is a filesystem root; nothing was changed", fix)
    home = _home()
    if home is not None and (path == home or path in home.parents):
        raise DataError(f"--out {path} is the home directory or a folder above it; nothing was changed", fix)
    if path.is_dir() and os.path.ismount(path):
        raise DataError(f"--out {path} is a filesystem root (a mount point); nothing was changed", fix)


def _check_sources(target: Location, sources: Sequence[str | Path]) -> None:
    if not _is_local(target):
        return  # sources are local files: an S3 target cannot overlap them
    t = Path(target.path)
    for src in sources:
        s = Path(src).expanduser().resolve()
        if s == t:
            raise DataError(f"--out {t} is the source itself", "write the output to a folder outside the source")
        if s in t.parents:
            raise DataError(f"--out {t} lies inside the source folder {s}",
                            "write the output to a folder outside the source")
        if t in s.parents:
            raise DataError(f"--out {t} contains the source {s}; replacing it would delete the source",
                            "write the output to a folder outside the source")


def _read_marker(target: Location, marker: str) -> dict[str, Any] | None:
    loc = target.join(marker)
    if not loc.is_file():
        return None
    try:
        data = json.loads(loc.read_bytes())
    except (OSError, ValueError) as err:
        raise _refuse(f"--out {target.uri} is not empty and its marker {marker} is unreadable "
                      f"({type(err).__name__})", target.uri) from err
    if not isinstance(data, dict):
        raise _refuse(f"--out {target.uri} is not empty and its marker {marker} is not a JSON object", target.uri)
    return data


def check_target(target: Location, writer: str, marker: str, sources: Sequence[str | Path] = ()) -> bool:
    """Whether `writer` may replace `target` (DataError when not); True when it holds content to replace."""
    _check_sources(target, sources)
    if _is_local(target):
        _check_local_place(Path(target.path))
    elif "/" not in target.path.strip("/"):
        raise DataError(f"--out {target.uri} is an S3 bucket root; nothing was changed",
                        _SUBFOLDER_FIX.format(path=target.uri.rstrip("/")))
    if not target.exists():
        return False
    if target.is_file():
        raise DataError(f"--out {target.uri} is a file, not a folder; nothing was changed",
                        "pick a new or empty folder for --out (the file is left as it is)")
    if not target.list():
        return False
    mark = _read_marker(target, marker)
    if mark is None:
        raise _refuse(f"--out {target.uri} is not empty and was not written by {writer} (no {marker} in it); "
                      f"nothing was changed", target.uri)
    if mark.get("writer") != writer:
        raise _refuse(f"--out {target.uri} holds output of {str(mark.get('writer'))[:60]!r}, not of {writer} "
                      f"(its {marker}); nothing was changed", target.uri)
    return True


def _sibling(target: Location, tag: str) -> Location:
    head, _, name = target.path.rstrip("/").rpartition("/")
    uhead = target.uri.rstrip("/").rpartition("/")[0]
    leaf = f".{name}.{tag}-{secrets.token_hex(4)}"
    return Location(target.fs, f"{head}/{leaf}", f"{uhead}/{leaf}")


def _marker_bytes(writer: str, details: dict[str, Any], complete: bool) -> bytes:
    body = {"writer": writer, "complete": complete,
            "written_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), **details}
    return json.dumps(body, indent=2, sort_keys=True, default=str).encode()


def _delete_quietly(loc: Location) -> None:
    try:
        loc.delete()
    except OSError as err:
        logger.warning("could not delete the temporary folder %s (%s); remove it by hand", loc.uri, err)


def _swap_local(stage: Location, target: Location) -> None:
    old: Location | None = None
    if target.exists():
        old = _sibling(target, "old")
        os.rename(target.path, old.path)
    try:
        os.rename(stage.path, target.path)
    except BaseException:
        if old is not None:
            os.rename(old.path, target.path)  # put the previous output back
        raise
    if old is not None:
        _delete_quietly(old)


def _swap_s3(stage: Location, target: Location, marker: str, marker_bytes: bytes, writer: str) -> None:
    fs = target.fs
    try:
        if target.exists():
            # the old marker stays until the new one replaces it: a failure in between leaves a folder that this
            # writer will replace on a re-run, never one it refuses
            target.join(marker).write_bytes(_marker_bytes(writer, {"replacing": True}, complete=False))
            for child in fs.get_file_info(pafs.FileSelector(target.path, recursive=False)):
                if child.base_name == marker:
                    continue
                if child.type == pafs.FileType.Directory:
                    fs.delete_dir(child.path)
                else:
                    fs.delete_file(child.path)
        pafs.copy_files(stage.path, target.path, source_filesystem=fs, destination_filesystem=fs)
        target.join(marker).write_bytes(marker_bytes)
    except (OSError, DataError) as err:
        raise DataError(f"replacing {target.uri} failed part way ({str(err).splitlines()[0][:200]}); the new output "
                        f"is complete at {stage.uri}",
                        f"re-run the same command: {target.uri} still carries the {marker} of {writer}, so the "
                        f"re-run replaces it") from err
    _delete_quietly(stage)


@contextlib.contextmanager
def replace_output(uri: str, writer: str, marker: str = EVENTS_MARKER,
                   sources: Sequence[str | Path] = ()) -> Iterator[Staged]:
    """Check `uri` (check_target), yield an empty staging folder beside it to write into, then put the
    staged output in its place with `writer`'s marker written last. If the body raises, the staging folder is
    removed and the target is left exactly as it was."""
    target = resolve(uri)
    check_target(target, writer, marker, sources)
    stage = _sibling(target, "tmp")
    try:
        if _is_local(target):
            Path(stage.path).parent.mkdir(parents=True, exist_ok=True)
        stage.mkdir()
    except OSError as err:
        raise DataError(f"cannot write next to --out {target.uri} ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:200]})",
                        "pick an --out location you can write to (on S3: an existing bucket)") from err
    staged = Staged(stage)
    swapping = False  # a failed S3 swap keeps the staged output: its message points the user at it
    try:
        yield staged
        check_target(target, writer, marker, sources)  # again: someone may have written there meanwhile
        body = _marker_bytes(writer, staged.details, complete=True)
        if _is_local(target):
            stage.join(marker).write_bytes(body)
            _swap_local(stage, target)
        else:
            swapping = True
            _swap_s3(stage, target, marker, body, writer)
    except BaseException:
        if not swapping and stage.exists():
            _delete_quietly(stage)
        raise
