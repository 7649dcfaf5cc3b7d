"""What the monitoring reads of the previous published date: which date that is, its manifest (whose `monitoring`
section holds its metrics), its item exposure (a small Parquet file next to that manifest) and the lists of
sampled users (pipeline.serving.recs). The only module here that knows how published dates are laid out."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import DataError
from pipeline.io import lake
from pipeline.io.publish import MANIFEST
from pipeline.serving import recs

log = logging.getLogger(__name__)


def previous_date(out: str, date: dt.date) -> dt.date | None:
    """The newest committed date before `date` (a re-run of a date is not compared with itself)."""
    return next((d for d in recs.committed_dates(out) if d < date), None)


def published_manifest(out: str, day: dt.date) -> tuple[lake.Location, dict[str, Any]] | None:
    """The run folder of `day`'s live files in the recommendations table and its manifest; None when it cannot be
    read, or the date's files come from more than one run (logged)."""
    try:
        _, root, _, merged = recs._open_committed(out, day)  # the table's snapshot: the date's live files by run folder
        folders = str(merged.get("run", "")).split(",")
        if len(folders) != 1 or not folders[0]:
            log.warning("monitoring: %s holds files of %d runs; no comparison with it", day, len(folders))
            return None
        run = root.join(folders[0])
        manifest = json.loads(run.join(MANIFEST).read_bytes())
        return (run, manifest) if isinstance(manifest, dict) else None
    except (DataError, OSError, ValueError) as e:
        log.warning("monitoring: the manifest of %s could not be read (%s); no comparison with it", day, e)
        return None


def write_exposure(run: lake.Location, name: str, vocab: pa.Array, exposure: np.ndarray,
                   first_rank: np.ndarray) -> dict[str, Any]:
    """The exposed items (id, slots, best rank) as Parquet in the run folder; its manifest entry."""
    hit = np.flatnonzero(exposure)
    table = pa.table({"item_id": vocab.take(pa.array(hit)), "exposure": pa.array(exposure[hit], pa.int64()),
                      "first_rank": pa.array(first_rank[hit], pa.int32())})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    data = buf.getvalue()
    run.join(name).write_bytes(data)
    return {"path": name, "items": len(hit), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def read_exposure(run: lake.Location, manifest: dict[str, Any]) -> tuple[pa.Array, np.ndarray] | None:
    """The previous date's exposed item ids and their slot counts; None when it recorded none or the file does not
    match its checksum (logged)."""
    entry = (manifest.get("monitoring") or {}).get("exposure")
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or "/" in entry["path"]:
        return None
    loc = run.join(entry["path"])
    try:
        data = loc.read_bytes()
        if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
            log.warning("monitoring: %s does not match its checksum; no exposure comparison", loc.uri)
            return None
        table = pq.read_table(pa.BufferReader(data))
    except (OSError, pa.ArrowInvalid) as e:
        log.warning("monitoring: %s could not be read (%s); no exposure comparison", loc.uri, e)
        return None
    return table.column("item_id").combine_chunks(), table.column("exposure").to_numpy()


def previous_lists(out: str, day: dt.date, users: pa.Array) -> pa.Table | None:
    """The previous date's lists (user_id, item_ids) of `users`; None when they cannot be read (logged)."""
    try:
        return recs.read_recommendations(out, day, user_ids=users.to_pylist(), columns=["user_id", "item_ids"])
    except DataError as e:
        log.warning("monitoring: the lists of %s could not be read (%s); no overlap", day, e)
        return None
