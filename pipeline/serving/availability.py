"""Availability at serving (issue 29): the titles that may be recommended on a date, and the lists restricted
to them before they are published.

`--availability URI` names a Parquet file or folder (local or s3://, e.g. `<lake>/availability/dt=D/`) with an
`item_id` column listing the AVAILABLE items of the date; without it every item is available (the output is
then exactly what it was before this module existed). `load_availability` turns the list into a mask over the
model's columns; `restrict` removes unavailable items from scored lists and backfills short lists.

Order of a restricted list: the model's items first (best first, unavailable ones removed), then, when fewer
than N remain, the most popular available items the user has not seen (`bundle.popularity`). The model ranks
only its top k + min(unavailable, OVERFETCH·k) items per user (memory: a [users, k'] result per shard), so a
user whose top k' holds many unavailable items is backfilled; a user whose available unseen items number fewer
than N gets all of them (a shorter list, counted as short). Backfilled items carry scores just below the
user's last model score (last - 1, last - 2, ...): their order, not their value, means something.

Bad lists, decided here: ids the model does not know are ignored and counted (titles added after training are
normal in a changing catalog; the model cannot score them anyway), and only a list where NONE of the ids is
known is an error, as is an empty list, a missing file, one without item_id, and a list under a dt=D folder
later than the job's date. Duplicate and null ids are ignored and counted.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from pipeline.errors import DataError
from pipeline.io import lake
from pipeline.serving.vocab import dense_lookup, map_items

if TYPE_CHECKING:
    from pipeline.io.bundle import ModelBundle

OVERFETCH = 2  # extra candidates per user, in multiples of N, to replace unavailable items before backfilling
_DT = re.compile(r"(?:^|/)dt=(\d{4}-\d{2}-\d{2})(?:/|$)")


@dataclass(frozen=True)
class Availability:
    """The available model columns of a date (mask[c]: column c may be recommended) and what the list held."""

    uri: str
    mask: np.ndarray  # [n_items] bool
    listed: int  # rows in the list with an id
    unknown: int  # distinct listed ids the model does not know (ignored)
    duplicates: int  # repeated rows (ignored)
    nulls: int  # rows without an id (ignored)

    def stats(self) -> dict[str, Any]:
        """The manifest's record of the list."""
        return {"availability_uri": lake.resolve(self.uri).uri, "available_items": int(self.mask.sum()),
                "availability_listed": self.listed, "availability_unknown_ids": self.unknown,
                "availability_duplicate_ids": self.duplicates, "availability_null_ids": self.nulls}


def check_not_after(uri: str, date: dt.date, what: str, fix: str, example: str) -> None:
    """A per-date list under a dt=D folder must not be dated after the job's date (nor carry an invalid date)."""
    dated = _DT.findall(uri.rstrip("/"))
    if not dated:
        return
    try:
        day = dt.date.fromisoformat(dated[-1])
    except ValueError as e:
        raise DataError(f"{what} {uri} has an invalid date {dated[-1]!r}", fix) from e
    if day > date:
        raise DataError(f"{what} {uri} is dated {day}, after the job's date {date}",
                        f"pass the list of {date} (or an earlier one), e.g. {example}")


def load_availability(uri: str, date: dt.date, vocab: pa.Array) -> Availability:
    """The list at `uri` as a mask over `vocab`'s columns; DataError (one line: problem, fix) for a bad list."""
    fix_list = "pass --availability a Parquet file or folder with an item_id column of the date's available items"
    check_not_after(uri, date, "availability list", fix_list, f"<lake>/availability/dt={date}/")
    loc = lake.resolve(uri)
    if not loc.exists():
        raise DataError(f"no availability list at {loc.uri}", fix_list)
    try:
        dataset = ds.dataset(loc.path, filesystem=loc.fs, format="parquet")
        if "item_id" not in dataset.schema.names:
            raise DataError(f"availability list {loc.uri} lacks an item_id column (it has {dataset.schema.names[:8]})",
                            fix_list)
        ids = dataset.to_table(columns=["item_id"]).column("item_id").combine_chunks()
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"cannot read the availability list at {loc.uri}: {str(e).splitlines()[0][:200]}", fix_list) from e
    nulls = ids.null_count
    ids = ids.drop_null()
    if len(ids) == 0:
        raise DataError(f"availability list {loc.uri} is empty: nothing could be recommended",
                        "pass the date's list of available items, or leave --availability out (every item available)")
    distinct = pc.unique(ids)
    cols = map_items(distinct, vocab, dense_lookup(vocab))
    known = cols[cols >= 0]
    if len(known) == 0:
        raise DataError(f"none of the {len(distinct)} item ids in the availability list {loc.uri} is known to the model "
                        f"(e.g. {distinct[0].as_py()!r})",
                        "check that the list and the model share a catalog and id type (item_id int64 or string)")
    mask = np.zeros(len(vocab), bool)
    mask[known] = True
    return Availability(uri, mask, len(ids), int(len(distinct) - len(known)), int(len(ids) - len(distinct)), nulls)


def candidates(k: int, n_items: int, mask: np.ndarray) -> int:
    """How many items to rank per user so that, usually, k available ones remain."""
    return min(n_items, k + min(int((~mask).sum()), OVERFETCH * k))


def popular_available(bundle: ModelBundle, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The available columns by training popularity (ties: lower column first) and their fallback scores."""
    order, scores = bundle.fallback(bundle.n_items)
    keep = mask[order]
    return order[keep], scores[keep]


def restrict(top: np.ndarray, scores: np.ndarray, k: int, mask: np.ndarray, pop: np.ndarray,
             indptr: np.ndarray, cols: np.ndarray, top_n: int,
             blocked: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Scored rows [m, k'] (seen items at -inf) → [m, k] with unavailable items removed and short lists backfilled
    from `pop` (available columns, most popular first) minus the user's seen items; -inf pads what stays empty.
    `blocked` (CSR parts over the same rows, pipeline.serving.exclusions): per-user columns removed the same way
    and never backfilled.

    Returns (top, scores, backfilled users, short users: fewer than N items in the end)."""
    keep = mask[top]
    if blocked is not None:
        n_items = np.int64(len(mask))
        b_rows = np.repeat(np.arange(len(top), dtype=np.int64), np.diff(blocked[0]))
        b_keys = b_rows * n_items + blocked[1]
        keep &= ~np.isin(np.arange(len(top), dtype=np.int64)[:, None] * n_items + top, b_keys)
        seen_keys = np.repeat(np.arange(len(top), dtype=np.int64), np.diff(indptr)) * n_items + cols
        union = np.union1d(seen_keys, b_keys)  # seen or blocked: neither may be backfilled
        u_rows = union // n_items
        indptr = np.zeros(len(top) + 1, np.int64)
        np.cumsum(np.bincount(u_rows, minlength=len(top)), out=indptr[1:])
        cols = union - u_rows * n_items
    s = np.where(keep, scores, -np.inf).astype(np.float32)
    order = np.argsort(s == -np.inf, axis=1, kind="stable")[:, :k]  # valid entries first, in their order
    top, s = np.take_along_axis(top, order, 1), np.take_along_axis(s, order, 1)
    have = (s > -np.inf).sum(axis=1)
    rows = np.repeat(np.arange(len(have)), np.diff(indptr))
    seen_avail = np.bincount(rows, weights=mask[cols], minlength=len(have)).astype(np.int64)
    target = np.minimum(min(top_n, k), int(mask.sum()) - seen_avail)
    backfilled = 0
    for r in np.flatnonzero(have < target):
        exclude = set(cols[indptr[r]:indptr[r + 1]].tolist()) | set(top[r, :have[r]].tolist())
        extra = [c for c in pop[: int(target[r]) + len(exclude)].tolist() if c not in exclude][: int(target[r] - have[r])]
        if not extra:
            continue
        base = float(s[r, have[r] - 1]) if have[r] else 0.0
        n = len(extra)
        top[r, have[r]:have[r] + n] = extra
        s[r, have[r]:have[r] + n] = base - np.arange(1, n + 1, dtype=np.float32)
        have[r] += n
        backfilled += 1
    return top, s, backfilled, int((have < min(top_n, k)).sum())
