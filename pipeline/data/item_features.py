"""Item metadata (the items contract) → MARec's feature blocks, cached by content hash.

Which columns become blocks (``default_blocks``): list columns of genres/tags/people as multi-hot, a categorical
``type`` as one-hot, free text (``description``/``plot``) as TF-IDF (or, as block ``plot:wordllama``, sentence
embeddings: pipeline.data.text_embedding), ``year`` as decades (model.metadata). Every block but the embeddings
is min-max scaled per column. Left out by default: ``imdb_genres`` (ml-1m: repeats the genres in ``tags``),
``tags`` where ``genres`` exists (ml-latest-small: tags = genres + the interacting users' own tags, a leak for
strict cold start), and popularity statistics (anime's ``site_rating``, ``members``).

``feature_blocks(..., cache_dir=...)`` keys the blocks by a SHA-256 of the inputs (this module's version, the block
names, the item ids in column order and each used column's values), so the same day's items and the same model
columns reuse the blocks and any change to them builds new ones. Entries are written atomically (one object).
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from model.metadata import decade_one_hot, minmax_columns, multi_hot, tfidf
from model.text_encoder import encoder_problem, is_embedding, split_block
from pipeline.data.items import TEXT_COLUMNS
from pipeline.data.text_embedding import sentence_embeddings
from pipeline.errors import DataError
from pipeline.io.lake import resolve
from pipeline.io.publish import write_single_object

VERSION = 2  # bump when a block's construction changes: old cache entries then stop matching
LIST_BLOCKS = ("tags", "genres", "directors", "writers", "actors")
SCALAR_BLOCKS = ("type",)  # a categorical attribute as a one-value list
NOT_CONTENT = ("site_rating", "members")


def default_blocks(columns: Any) -> list[str]:
    cols = set(columns)
    out = [c for c in LIST_BLOCKS if c in cols]
    if "genres" in cols and "tags" in cols:
        out.remove("tags")
    out += [c for c in SCALAR_BLOCKS if c in cols]
    out += [c for c in TEXT_COLUMNS if c in cols]
    if "year" in cols:
        out.append("year")
    return [c for c in out if c not in NOT_CONTENT]


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and v != v)


def block_column(name: str) -> str:
    """The item column a block reads: "plot:wordllama" (free text through an encoder) reads "plot"."""
    return split_block(name)[0]


def build_block(items: pd.DataFrame, name: str, item_ids: np.ndarray) -> sp.csr_matrix:
    """One raw (unscaled) block [len(item_ids), *] from the items frame indexed by item_id; unknown ids: empty rows.
    A free-text column is TF-IDF by default; "<column>:<encoder>" picks the encoder (model.text_encoder)."""
    column, encoder = split_block(name)
    if column not in items.columns:
        raise DataError(f"items have no column {column!r} (columns: {', '.join(map(str, items.columns))})",
                        "pick blocks among the items' columns")
    problem = encoder_problem(name, TEXT_COLUMNS)
    if problem is not None:
        raise DataError(problem, f"use e.g. 'plot:wordllama', or {column!r} alone")
    col = items[column].reindex(item_ids)
    if column in TEXT_COLUMNS:
        texts = [v if isinstance(v, str) else None for v in col]
        return sentence_embeddings(texts) if encoder == "wordllama" else tfidf(texts, max_words=1000)
    if name == "year":
        return decade_one_hot([None if _missing(v) else int(v) for v in col])
    first = next((v for v in col if not _missing(v)), None)
    if isinstance(first, str):
        return multi_hot([[v] if isinstance(v, str) and v else [] for v in col])
    return multi_hot([[] if _missing(v) else [str(t) for t in v] for v in col])


def content_key(items: pd.DataFrame, names: list[str], item_ids: np.ndarray) -> str:
    h = hashlib.sha256(json.dumps({"version": VERSION, "blocks": names}).encode())
    h.update(np.asarray(item_ids).astype(str).astype("U").tobytes())
    for n in names:
        c = block_column(n)
        col = items[c].reindex(item_ids) if c in items.columns else pd.Series(dtype=object)
        h.update(json.dumps([None if _missing(v) else (v if isinstance(v, (str, int, float)) else list(map(str, v)))
                             for v in col], default=str).encode())
    return h.hexdigest()


def feature_blocks(items: pd.DataFrame, item_ids: np.ndarray, names: list[str],
                   cache_dir: Path | str | None = None) -> dict[str, sp.csr_matrix]:
    """The min-max scaled blocks {name: [len(item_ids), *]} in `names` order (empty blocks dropped)."""
    key = content_key(items, names, item_ids) if cache_dir is not None else ""
    loc = resolve(cache_dir).join(f"{key}.npz") if cache_dir is not None else None
    if loc is not None and loc.exists():
        with np.load(io.BytesIO(loc.read_bytes())) as z:
            return {n: sp.csr_matrix((z[f"{n}/data"], z[f"{n}/indices"], z[f"{n}/indptr"]), shape=tuple(z[f"{n}/shape"]))
                    for n in json.loads(str(z["names"]))}
    blocks = {n: build_block(items, n, item_ids) if is_embedding(n) else minmax_columns(build_block(items, n, item_ids))
              for n in names}
    blocks = {n: b for n, b in blocks.items() if b.shape[1] > 0}
    if loc is not None:
        arrays: dict[str, np.ndarray] = {"names": np.array(json.dumps(list(blocks)))}
        for n, b in blocks.items():
            arrays |= {f"{n}/data": b.data, f"{n}/indices": b.indices, f"{n}/indptr": b.indptr,
                       f"{n}/shape": np.array(b.shape)}
        buf = io.BytesIO()
        np.savez(buf, **arrays)  # type: ignore[arg-type]
        loc.mkdir_parent()
        write_single_object(loc, buf.getvalue())
    return blocks
