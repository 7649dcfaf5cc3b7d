"""The model's item vocabulary: external item ids ↔ the model's columns.

`vocabulary` gives the bundle's ids as an Arrow array (column c is `vocab[c]`); `map_items` turns event item
ids into columns (-1 for items the model does not know), through a dense lookup table when the ids are
integers in a compact range (`dense_lookup`), else a hash lookup. Used by the spill (events → columns), the
output checks (recommended ids → columns) and the Spark engine (its broadcast join table).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

if TYPE_CHECKING:
    from pipeline.io.bundle import ModelBundle


def vocabulary(bundle: ModelBundle) -> pa.Array:
    """The bundle's item ids, column by column: int64 for integer ids, else strings."""
    ids = bundle.item_ids
    return pa.array(ids.astype(np.int64)) if np.issubdtype(ids.dtype, np.integer) else pa.array(ids.astype(str))


def dense_lookup(vocab: pa.Array) -> np.ndarray | None:
    """For integer ids in a compact range: lut[id] = column (-1 where unknown, and in one slot past the largest
    id, where map_items sends ids outside the table); else None (hash lookup)."""
    if not pa.types.is_integer(vocab.type) or len(vocab) == 0 or vocab.null_count:
        return None
    ids = vocab.to_numpy().astype(np.int64)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= 16 * len(ids) + (1 << 20):  # sparse ids: a table would waste memory
        return None
    lut = np.full(hi + 2, -1, np.int32)
    lut[ids] = np.arange(len(ids), dtype=np.int32)
    return lut


def map_items(items: pa.Array, vocab: pa.Array, lut: np.ndarray | None = None) -> np.ndarray:
    """External item ids → model columns (int32), -1 for ids the model does not know.

    `lut` (from `dense_lookup(vocab)`) turns the hash lookup into one gather: several times faster for the
    usual integer ids."""
    if items.type != vocab.type:
        try:
            items = items.cast(vocab.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # e.g. string ids against an int vocabulary
            return np.full(len(items), -1, np.int32)
    if lut is not None and items.null_count == 0:
        # as unsigned, negative ids are huge too: one clamp sends every id outside the table to its -1 slot
        ids = items.to_numpy().astype(np.int64, copy=False).view(np.uint64)
        return lut[np.minimum(ids, np.uint64(len(lut) - 1))]
    idx = pc.index_in(items, value_set=vocab)
    return idx.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int32)
