"""Per-user exclusions at serving (issue 29): titles one user must not be shown on a date ("not interested",
parental rules, already bought elsewhere), removed before top-N like unavailable titles.

`--exclusions URI` names a Parquet file or folder (local or s3://, e.g. `<lake>/exclusions/dt=D/`) with
`user_id` and `item_id` columns, one row per (user, excluded title). The excluded titles are not input to the
model (the user did not click them); they are only removed from that user's list, which is then backfilled like
an availability-restricted list (pipeline.serving.availability.restrict): the model's next items first, then
popular available unseen ones.

The titles are resolved against the vocabulary the engines publish: the model's items plus the day's scored new
items (pipeline.serving.cold_items.extend_vocab; new item j is column n_items + j), so an excluded new title is
kept out of that user's list by the cold merge as a model item is by the restriction.

Bad lists, decided here as for availability: rows whose title is in neither (unknown to the model and not a new
title scored that day: it cannot be shown anyway), null ids and repeated rows are ignored and counted; a missing
file, one without both columns, or one under a dt=D folder later than the job's date is an error. An empty list
is a valid no-op (nobody excluded anything), unlike an empty availability list, which would leave nothing to
recommend.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from pipeline.errors import DataError
from pipeline.io import lake
from pipeline.serving.availability import check_not_after
from pipeline.serving.vocab import dense_lookup, map_items

FIX = "pass --exclusions a Parquet file or folder with user_id and item_id columns (one row per excluded title)"


@dataclass(frozen=True)
class Exclusions:
    """The (user, column) pairs of a date (columns of the model plus the day's new items), deduplicated, and what
    the list held."""

    uri: str
    users: pa.Array  # [E] user ids
    cols: np.ndarray  # [E] int32 columns of the vocabulary loaded against (n_items + j: new item j)
    listed: int  # rows with both ids
    unknown: int  # rows whose item is not in that vocabulary (ignored)
    duplicates: int  # repeated (user, item) rows (ignored)
    nulls: int  # rows missing an id (ignored)

    def stats(self) -> dict[str, Any]:
        """The manifest's record of the list."""
        return {"exclusions_uri": lake.resolve(self.uri).uri, "exclusions": len(self.cols),
                "exclusions_listed": self.listed, "exclusions_unknown_items": self.unknown,
                "exclusions_duplicates": self.duplicates, "exclusions_null_ids": self.nulls}

    def for_users(self, users: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """The excluded columns of each of `users` (a shard's rows) as CSR parts (indptr [n+1], sorted cols)."""
        n = len(users)
        if len(self.cols) == 0 or n == 0:
            return np.zeros(n + 1, np.int64), np.zeros(0, np.int64)
        mine = self.users if self.users.type == users.type else _cast(self.users, users.type)
        rows = pc.index_in(mine, value_set=users).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
        hit = rows >= 0
        rows, cols = rows[hit], self.cols[hit].astype(np.int64)
        order = np.lexsort((cols, rows))
        indptr = np.zeros(n + 1, np.int64)
        np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
        return indptr, cols[order]

    def as_table(self, user_type: pa.DataType) -> pa.Table:
        """(user_id as `user_type`, col int32) for the pairs whose user id converts to it, as `for_users` matches
        them (the Spark engine joins this to its users instead of looking each shard up here)."""
        users = self.users if self.users.type == user_type else _cast(self.users, user_type)
        table = pa.table({"user_id": users, "col": pa.array(self.cols, pa.int32())})
        return table.filter(pc.is_valid(table["user_id"]))


def _cast(ids: pa.Array, to: pa.DataType) -> pa.Array:
    try:
        return ids.cast(to)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # e.g. string ids against integer users: none match
        return pa.nulls(len(ids), to)


def load_exclusions(uri: str, date: dt.date, vocab: pa.Array) -> Exclusions:
    """The list at `uri` over `vocab`'s columns (the engines pass the model's plus the day's scored new items);
    DataError (one line: problem, fix) for a bad list."""
    check_not_after(uri, date, "exclusion list", FIX, f"<lake>/exclusions/dt={date}/")
    loc = lake.resolve(uri)
    if not loc.exists():
        raise DataError(f"no exclusion list at {loc.uri}", FIX)
    try:
        dataset = ds.dataset(loc.path, filesystem=loc.fs, format="parquet")
        missing = [c for c in ("user_id", "item_id") if c not in dataset.schema.names]
        if missing:
            raise DataError(f"exclusion list {loc.uri} lacks {' and '.join(missing)} (it has {dataset.schema.names[:8]})",
                            FIX)
        table = dataset.to_table(columns=["user_id", "item_id"]).combine_chunks()
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"cannot read the exclusion list at {loc.uri}: {str(e).splitlines()[0][:200]}", FIX) from e
    complete = pc.and_(pc.is_valid(table["user_id"]), pc.is_valid(table["item_id"]))
    nulls = len(table) - int(pc.sum(complete).as_py() or 0)
    table = table.filter(complete)
    cols = map_items(table["item_id"].combine_chunks(), vocab, dense_lookup(vocab))
    known = cols >= 0
    users = table["user_id"].combine_chunks().filter(pa.array(known))
    pairs = pa.table({"user_id": users, "col": pa.array(cols[known])})
    unique = pairs.group_by(["user_id", "col"]).aggregate([])
    return Exclusions(uri, unique["user_id"].combine_chunks(), unique["col"].to_numpy().astype(np.int32),
                      listed=len(table), unknown=int((~known).sum()), duplicates=len(pairs) - len(unique), nulls=nulls)
