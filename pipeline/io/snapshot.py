"""The matrix snapshot: the weekly data build's output and the training job's input.

Layout under one snapshot folder (URI: a local path or s3://), published by writing manifest.json last:

    <snapshot>/manifest.json                 the published pointer: {"run": "run-<id>", files, counts, hashes, ...}
    <snapshot>/run-<id>/users/*.parquet      user_idx int64, user_id (int64 or string), role: train|valid|test|inactive
    <snapshot>/run-<id>/items/*.parquet      item_idx int64, item_id (int64 or string)   (column of the matrix)
    <snapshot>/run-<id>/train/*.parquet      user_idx int64, item_idx int64               (training users' items)
    <snapshot>/run-<id>/heldout/*.parquet    user_idx int64, item_idx int64, role: valid|test, part: fold_in|target
    <snapshot>/run-<id>/item_metadata/*.parquet   optional (BuildMatrixJob.items): item_id, item_idx (null outside
                                             the matrix), cold (no training click this snapshot), the items contract's
                                             columns (pipeline.io.items) as of the snapshot date

user_idx and item_idx are stable across weekly snapshots: a user seen before but without events in this window
stays as role `inactive` (in no matrix), an item keeps its column even without training interactions this week.

A re-run writes a new run-<id> folder, then replaces manifest.json (one atomic object write: readers see the
old snapshot or the new one). From then on the new run is published and is never removed, whatever fails
later. Clean-up keeps the run the new manifest replaced, so a reader that read the previous manifest a
moment earlier can still read its files (only a second rebuild within that read removes them); older runs
and unpublished leftovers are deleted, and a failed delete is only a warning (the next build retries it).
Readers trust only what the manifest names.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp

from model.split import HeldOut, Split
from pipeline.errors import DataError
from pipeline.io.lake import Location, is_temporary, resolve
from pipeline.io.publish import new_run_id as sortable_run_id
from pipeline.io.publish import write_single_object

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
TABLES = ("users", "items", "train", "heldout")


@dataclass(frozen=True, eq=False)
class Snapshot:
    """A loaded snapshot: the trainer's sparse inputs plus the id maps."""

    snapshot_id: str
    train: sp.csr_matrix  # [n_train_users, n_items], rows in ascending user_idx of the train users
    valid: HeldOut  # users = user_idx values
    test: HeldOut
    train_users: np.ndarray  # user_idx of train's rows
    user_ids: np.ndarray  # external id of each user_idx
    item_ids: np.ndarray  # external id of each item_idx (column)
    manifest: dict[str, Any] = field(default_factory=dict)
    item_metadata: pa.Table | None = None  # the optional item_metadata table (None: built without items)

    @property
    def n_items(self) -> int:
        return int(self.train.shape[1])

    @property
    def split(self) -> Split:
        return Split(self.train, self.valid, self.test, self.train_users, np.arange(self.n_items, dtype=np.int64))

    def item_popularity(self) -> np.ndarray:
        """Training interactions per item column (the fallback ranking)."""
        return np.asarray(self.train.sum(axis=0)).ravel().astype(np.float32)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def table_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def new_run_id() -> str:
    """run-<UTC start time, microseconds>-<random>: runs of one snapshot sort by start time (publish relies on it)."""
    return f"run-{sortable_run_id()}"


_STAMPED = re.compile(r"^run-\d{8}T\d{6}")


def run_order(name: str) -> tuple[int, str]:
    """Sort key of run folders: by start time; ids from before time-sorted ids (run-<hex>) count as older."""
    return (1 if _STAMPED.match(name) else 0, name)


def published_run(root: Location) -> str | None:
    """The run the current manifest names; None without a readable manifest (I/O errors raise)."""
    try:
        raw = root.join(MANIFEST).read_bytes()
    except FileNotFoundError:
        return None
    try:
        return str(json.loads(raw)["run"])
    except (ValueError, KeyError, TypeError):
        return None  # corrupt: it names no run anyone can read


def publish(root: Location, run_id: str, files: dict[str, dict[str, Any]], manifest: dict[str, Any]) -> None:
    """Write manifest.json last (the publish step), then remove runs older than the one it replaced.

    Builds of one snapshot may overlap (a manual rebuild during the scheduled one): the newest started wins. An
    older build never replaces a newer one's manifest, and clean-up leaves newer run folders (a build still
    writing) to their own build."""
    replaced = published_run(root)
    if replaced is not None and run_order(replaced) > run_order(run_id):
        raise DataError(f"snapshot {root.uri}: a newer build ({replaced}) is published already, so this one "
                        f"({run_id}) was not", "let one build per as-of date run at a time; re-run if needed")
    keep = {run_id, replaced}
    body = {**manifest, "format_version": FORMAT_VERSION, "run": run_id, "files": files}
    write_single_object(root.join(MANIFEST), json.dumps(body, indent=2, sort_keys=True, default=str).encode())
    # published: nothing below may fail the build or touch run_id
    try:
        stale = [n for n in root.list() if (n.startswith("run-") and n not in keep and run_order(n) < run_order(run_id))
                 or is_temporary(n, MANIFEST)]
    except Exception as e:
        log.warning("snapshot %s: could not list old runs (%s); the next build removes them", root.uri, e)
        stale = []
    for name in stale:
        try:
            root.join(name).delete()
        except Exception as e:
            log.warning("snapshot %s: could not delete %s (%s); the next build retries", root.uri, name, e)


def discard(root: Location, run_id: str) -> None:
    """Remove a run that failed to publish, unless the manifest names it (a write that failed late may have
    landed) or cannot be read: a stray folder is harmless, a published one deleted is not."""
    try:
        if published_run(root) == run_id:
            return
    except Exception:
        return
    root.join(run_id).delete()


def write_run(root: Location, tables: dict[str, pa.Table], manifest: dict[str, Any]) -> str:
    """Write `tables` as a new run and publish it; returns its run id. A failure before the manifest names the
    new run removes its folder (the previous snapshot stays published)."""
    root.check_writable()
    run_id = new_run_id()
    try:
        publish(root, run_id, write_tables(root, run_id, tables), manifest)
    except BaseException:
        discard(root, run_id)
        raise
    return run_id


def write_tables(root: Location, run_id: str, tables: dict[str, pa.Table]) -> dict[str, dict[str, Any]]:
    """Write each table as one Parquet file under <root>/<run_id>/<table>/; return {relative path: rows, sha256}."""
    files: dict[str, dict[str, Any]] = {}
    for name, table in tables.items():
        data = table_bytes(table)
        rel = f"{run_id}/{name}/part-00000.parquet"
        root.join(*rel.split("/")).write_bytes(data)
        files[rel] = {"rows": table.num_rows, "bytes": len(data), "sha256": _sha256(data)}
    return files


def _ids(values: np.ndarray) -> pa.Array:
    return pa.array(values.astype(np.int64)) if np.issubdtype(values.dtype, np.integer) else pa.array(values.astype(str))


def snapshot_tables(user_ids: np.ndarray, item_ids: np.ndarray, split: Split) -> dict[str, pa.Table]:
    """The four tables from an in-memory split of a users × items matrix (rows = user_idx, columns = item_idx).

    split.item_index selects the kept columns; their order becomes the snapshot's item_idx.
    """
    item_index = split.item_index
    users = []
    roles = []
    for role, idx in (("train", split.train_users), ("valid", split.valid.users), ("test", split.test.users)):
        users.append(idx)
        roles += [role] * len(idx)
    user_idx = np.concatenate(users).astype(np.int64)
    order = np.argsort(user_idx, kind="stable")
    users_t = pa.table({"user_idx": pa.array(user_idx[order]), "user_id": _ids(np.asarray(user_ids)[user_idx[order]]),
                        "role": pa.array(np.array(roles, dtype=object)[order].astype(str))})
    items_t = pa.table({"item_idx": pa.array(np.arange(len(item_index), dtype=np.int64)),
                        "item_id": _ids(np.asarray(item_ids)[item_index])})

    def pairs(m: sp.csr_matrix, rows_to_user: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        coo = m.tocoo()
        return rows_to_user[coo.row].astype(np.int64), coo.col.astype(np.int64)

    tu, ti = pairs(split.train, split.train_users)
    train_t = pa.table({"user_idx": tu, "item_idx": ti})
    parts = []
    for role, h in (("valid", split.valid), ("test", split.test)):
        for part, m in (("fold_in", h.fold_in), ("target", h.targets)):
            u, i = pairs(m, h.users)
            parts.append(pa.table({"user_idx": u, "item_idx": i, "role": pa.array([role] * len(u), pa.string()),
                                   "part": pa.array([part] * len(u), pa.string())}))
    heldout_t = pa.concat_tables(parts)
    return {"users": users_t, "items": items_t, "train": train_t, "heldout": heldout_t}


def write_snapshot(uri: str, user_ids: np.ndarray, item_ids: np.ndarray, split: Split,
                   manifest: dict[str, Any] | None = None) -> str:
    """Write a snapshot from memory (tests, small data, the experiment harness); returns the snapshot URI."""
    root = resolve(uri)
    tables = snapshot_tables(user_ids, item_ids, split)
    counts = {"users": tables["users"].num_rows, "items": tables["items"].num_rows,
              "train_users": len(split.train_users), "train_interactions": tables["train"].num_rows,
              "valid_users": len(split.valid.users), "test_users": len(split.test.users)}
    write_run(root, tables, {"snapshot_id": root.path.rstrip("/").rsplit("/", 1)[-1], "counts": counts,
                             **(manifest or {})})
    return root.uri


REBUILD = "rebuild the snapshot with `recsys build-matrix` (same --as-of and --out)"
COLUMNS = {"users": ("user_idx", "user_id", "role"), "items": ("item_idx", "item_id"), "train": ("user_idx", "item_idx"),
           "heldout": ("user_idx", "item_idx", "role", "part"), "item_metadata": ("item_id", "item_idx", "cold")}
OPTIONAL_TABLES = ("item_metadata",)  # older snapshots have none: loaded as None


def read_table(root: Location, manifest: dict[str, Any], name: str, verify: bool) -> pa.Table:
    """One table of a snapshot, from the files its manifest names (hashes checked when `verify`); a missing,
    altered or unreadable file is a DataError naming it."""
    rels = sorted(r for r in manifest["files"] if r.split("/")[1] == name)
    if not rels:
        raise DataError(f"snapshot {root.uri} has no {name!r} table in its manifest", "rebuild the snapshot")
    tables = []
    for rel in rels:
        loc = root.join(*rel.split("/"))
        try:
            data = loc.read_bytes()
        except FileNotFoundError as e:
            raise DataError(f"snapshot file {loc.uri} is missing (its manifest names it)", REBUILD) from e
        if verify and _sha256(data) != manifest["files"][rel]["sha256"]:
            raise DataError(f"snapshot file {rel} does not match its manifest hash", "rebuild the snapshot")
        try:
            # an Arrow-owned copy: Arrow I/O tasks still holding Python bytes after a decode error abort the
            # interpreter at exit (a C++ terminate, rc 134, seen with a tampered snapshot)
            buf = pa.allocate_buffer(len(data))
            np.frombuffer(buf, dtype=np.uint8)[:] = np.frombuffer(data, dtype=np.uint8)
            table = pq.read_table(pa.BufferReader(buf))
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"snapshot file {loc.uri} is not readable Parquet ({e})", REBUILD) from e
        missing = [c for c in COLUMNS.get(name, ()) if c not in table.column_names]
        if missing:
            raise DataError(f"snapshot file {loc.uri} lacks column(s) {missing}", REBUILD)
        tables.append(table)
    return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]


def read_manifest(uri: str) -> dict[str, Any]:
    """The published manifest of the snapshot at `uri`, checked to name a run and its files (else a DataError
    naming manifest.json)."""
    root = resolve(uri)
    m = root.join(MANIFEST)
    if not m.exists():
        raise DataError(f"no published snapshot at {root.uri} (no {MANIFEST})",
                        "pass the folder of a snapshot built by `recsys build-matrix`, or build one")
    manifest = m.read_json(fix=REBUILD)
    problem = _manifest_problem(manifest)
    if problem:
        raise DataError(f"snapshot manifest {m.uri} is malformed: {problem}", REBUILD)
    return manifest


def _manifest_problem(manifest: Any) -> str | None:
    if not isinstance(manifest, dict):
        return f"a JSON {type(manifest).__name__}, not an object"
    if not isinstance(manifest.get("run"), str):
        return "no run"
    files = manifest.get("files")
    if not isinstance(files, dict):
        return "no files"
    for rel, entry in files.items():
        if len(rel.split("/")) != 3 or not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            return f"bad file entry {rel[:80]!r}"
    return None


def load_snapshot(uri: str, verify: bool = True) -> Snapshot:
    """One call from a snapshot URI to the trainer's inputs (CSR matrices + id maps)."""
    root = resolve(uri)
    manifest = read_manifest(uri)
    t = {name: read_table(root, manifest, name, verify) for name in TABLES}
    users, items = t["users"].sort_by("user_idx"), t["items"].sort_by("item_idx")
    n_users, n_items = users.num_rows, items.num_rows
    if not np.array_equal(users["user_idx"].to_numpy(), np.arange(n_users)) or \
            not np.array_equal(items["item_idx"].to_numpy(), np.arange(n_items)):
        raise DataError(f"snapshot {root.uri}: user_idx/item_idx are not 0..n-1", "rebuild the snapshot")
    roles = users["role"].to_numpy(zero_copy_only=False).astype(str)

    def matrix(rows: np.ndarray, u: np.ndarray, i: np.ndarray) -> sp.csr_matrix:
        pos = np.full(n_users, -1, dtype=np.int64)
        pos[rows] = np.arange(len(rows))
        m = sp.csr_matrix((np.ones(len(u), np.float32), (pos[u], i)), shape=(len(rows), n_items))
        m.sum_duplicates()
        m.data[:] = 1.0
        return m

    train_users = np.flatnonzero(roles == "train").astype(np.int64)
    tr = t["train"]
    train = matrix(train_users, tr["user_idx"].to_numpy(), tr["item_idx"].to_numpy())
    ho = t["heldout"]
    h_role = ho["role"].to_numpy(zero_copy_only=False).astype(str)
    h_part = ho["part"].to_numpy(zero_copy_only=False).astype(str)
    hu, hi = ho["user_idx"].to_numpy(), ho["item_idx"].to_numpy()

    def held(role: str) -> HeldOut:
        rows = np.flatnonzero(roles == role).astype(np.int64)
        sel = {p: (h_role == role) & (h_part == p) for p in ("fold_in", "target")}
        return HeldOut(matrix(rows, hu[sel["fold_in"]], hi[sel["fold_in"]]),
                       matrix(rows, hu[sel["target"]], hi[sel["target"]]), rows)

    return Snapshot(
        snapshot_id=str(manifest.get("snapshot_id", root.path.rsplit("/", 1)[-1])),
        train=train, valid=held("valid"), test=held("test"), train_users=train_users,
        user_ids=users["user_id"].to_numpy(zero_copy_only=False), item_ids=items["item_id"].to_numpy(zero_copy_only=False),
        manifest=manifest,
        item_metadata=read_table(root, manifest, "item_metadata", verify)
        if any(r.split("/")[1] == "item_metadata" for r in manifest["files"]) else None,
    )


def content_digest(manifest: dict[str, Any]) -> str:
    """A short digest of a snapshot's tables only: each file's table, name and sha256, without the run folder, the
    build's config or its inputs' paths. Two builds of the same input and seed have the same content digest on
    any engine (local[N], a standalone cluster, YARN), while their manifest digests differ (run id, config)."""
    parts = sorted((rel.split("/", 1)[1], entry["sha256"]) for rel, entry in manifest["files"].items())
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def manifest_digest(manifest: dict[str, Any]) -> str:
    """A short content digest of a snapshot: its manifest (which holds every file's sha256). Training tags each
    version with it; the gate refuses a snapshot rebuilt since."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, default=str).encode()).hexdigest()[:16]
