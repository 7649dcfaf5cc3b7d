"""The items contract's reading and validation (moved from pipeline.data.items so that serving, which may not
import pipeline.data, reads a day's items file with the same checks; pipeline.data.items re-exports these names
and keeps the ingest job). The contract and its rules are documented in pipeline.data.items.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pipeline.errors import DataError
from pipeline.io.ids import string_id_problem
from pipeline.io.lake import resolve

TEXT_COLUMNS = ("description", "plot")
ItemsFormat = Literal["parquet", "csv"]


def _utf8(col: pa.ChunkedArray, name: str, where: str) -> pa.ChunkedArray:
    """A string (or list<string>) column checked for valid UTF-8; binary columns are decoded strictly."""
    t = col.type
    inner = t.value_type if pa.types.is_list(t) or pa.types.is_large_list(t) else t
    if pa.types.is_binary(inner) or pa.types.is_large_binary(inner):
        target = pa.list_(pa.string()) if inner is not t else pa.string()
        try:
            return col.cast(target)  # arrow validates UTF-8 on this cast
        except pa.ArrowInvalid as e:
            raise DataError(f"{where}: column {name!r} holds text that is not valid UTF-8 ({str(e)[:120]})",
                            "re-export the items file as UTF-8") from e
    if pa.types.is_string(inner) or pa.types.is_large_string(inner):
        try:
            col.validate(full=True)
        except pa.ArrowInvalid as e:
            raise DataError(f"{where}: column {name!r} holds text that is not valid UTF-8 ({str(e)[:120]})",
                            "re-export the items file as UTF-8") from e
    return col


def _first_row(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0]) + 1  # 1-based data row


def _check_ids(ids: pa.ChunkedArray, where: str) -> pa.ChunkedArray:
    if ids.null_count:
        row = _first_row(np.asarray(ids.is_null().to_numpy(zero_copy_only=False)))
        raise DataError(f"{where}: item_id is missing on row {row} ({ids.null_count} rows without an id)",
                        "give every item an item_id")
    if pa.types.is_integer(ids.type):
        ids = ids.cast(pa.int64())
        values = ids.to_numpy()
        if (values < 0).any():
            raise DataError(f"{where}: item_id {int(values[values < 0][0])} on row {_first_row(values < 0)} is negative",
                            "use non-negative integer ids, as in the events")
    elif pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type):
        for i, v in enumerate(ids.to_pylist()):
            problem = string_id_problem(v)
            if problem:
                raise DataError(f"{where}: item_id on row {i + 1} {problem}", "use the ids of the events contract")
    else:
        raise DataError(f"{where}: item_id has type {ids.type}", "use integer or string item ids, as in the events")
    counts = pc.value_counts(ids)
    dup = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(dup):
        first = dup[0]["values"].as_py()
        raise DataError(f"{where}: item_id {first!r} appears {dup[0]['counts'].as_py()} times ({len(dup)} duplicated ids)",
                        "keep one row per item (the newest metadata) before ingesting")
    return ids


def _clean_tags(tags: pa.ChunkedArray) -> pa.Array:
    """Lower-cased, stripped, blanks and nulls dropped; a null list becomes [] (the documented no-op)."""
    out = []
    for row in tags.to_pylist():
        seen: dict[str, None] = {}
        for t in row or []:
            if t is not None and t.strip():
                seen.setdefault(t.strip().lower(), None)
        out.append(list(seen))
    return pa.array(out, type=pa.list_(pa.string()))


def validate_items(table: pa.Table, where: str = "items") -> pa.Table:
    """The table checked and normalised to the contract (see the module doc); raises DataError."""
    if "item_id" not in table.column_names:
        raise DataError(f"{where}: no item_id column (columns: {', '.join(table.column_names)[:200]})",
                        "name the id column item_id")
    if table.num_rows == 0:
        raise DataError(f"{where}: no items", "point at a non-empty items file")
    cols: dict[str, pa.ChunkedArray] = {}
    for name in table.column_names:
        cols[name] = _utf8(table.column(name), name, where)
    cols["item_id"] = _check_ids(cols["item_id"], where)
    if "title" not in cols:
        cols["title"] = pa.chunked_array([pa.nulls(table.num_rows, pa.string())])
    tags = cols.get("tags")
    if tags is None:
        tags = pa.chunked_array([pa.array([[]] * table.num_rows, type=pa.list_(pa.string()))])
    elif pa.types.is_null(tags.type) or (pa.types.is_list(tags.type) and pa.types.is_null(tags.type.value_type)):
        tags = tags.cast(pa.list_(pa.string()))  # every row empty or null: typed, then the no-metadata check
    elif not (pa.types.is_list(tags.type) and pa.types.is_string(tags.type.value_type)):
        raise DataError(f"{where}: tags has type {tags.type}", "store tags as a list of strings ('|'-separated in CSV)")
    cols["tags"] = pa.chunked_array([_clean_tags(tags)])
    has_tags = pc.greater(pc.list_value_length(cols["tags"]), 0)
    has_text = pa.chunked_array([pa.array([False] * table.num_rows)])
    for name in TEXT_COLUMNS:
        if name in cols and pa.types.is_string(cols[name].type):
            has_text = pc.or_(has_text, pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(pc.fill_null(cols[name], ""))), 0))
    if not pc.any(pc.or_(has_tags, has_text)).as_py():
        raise DataError(f"{where}: no item has tags or free text ({table.num_rows} items)",
                        "fill the tags column (or a description/plot column): metadata is what cold items are ranked by")
    order = ["item_id", "title", "tags", *[c for c in table.column_names if c not in ("item_id", "title", "tags")]]
    return pa.table({c: cols[c] for c in order})


def _read_csv(path: Path) -> pa.Table:
    """CSV with a header; ``tags`` '|'-separated. Invalid UTF-8 fails here (arrow checks it while parsing)."""
    try:
        t = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
    except pa.ArrowInvalid as e:
        msg = str(e)
        if "UTF8" in msg or "utf8" in msg.lower():
            raise DataError(f"{path}: text that is not valid UTF-8 ({msg[:160]})", "re-export the items file as UTF-8") from e
        raise DataError(f"{path}: not a readable CSV items file ({msg[:160]})",
                        "give a header with item_id,title,tags ('|'-separated tags)") from e
    if "tags" in t.column_names:
        raw = pc.fill_null(t.column("tags").cast(pa.string()), "")
        t = t.set_column(t.column_names.index("tags"), "tags", pc.split_pattern(raw, "|"))
    return t


def read_items(path: str | Path, fmt: ItemsFormat | None = None) -> pa.Table:
    """An items file (Parquet or CSV, by `fmt` or the suffix) or a published ``items/dt=D`` folder, validated."""
    p = Path(path)
    fmt = fmt or ("csv" if p.suffix.lower() == ".csv" else "parquet")
    if not p.exists():
        raise DataError(f"items file {p} does not exist", "check the path (a published day is <lake>/items/dt=YYYY-MM-DD)")
    if fmt == "csv":
        table = _read_csv(p)
    else:
        try:
            table = pq.read_table(p)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{p}: not a readable Parquet items file ({str(e)[:160]})", "re-export it as Parquet") from e
    return validate_items(table, str(p))


def read_items_uri(uri: str) -> pa.Table:
    """An items file or folder (Parquet/CSV locally, Parquet on s3://), validated by the contract."""
    loc = resolve(uri)
    if loc.uri == loc.path:  # local: read_items handles CSV and folders
        return read_items(loc.path)
    try:
        table = ds.dataset(loc.path, filesystem=loc.fs, format="parquet").to_table()
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{loc.uri}: not a readable Parquet items file ({str(e)[:160]})", "re-export it as Parquet") from e
    return validate_items(table, loc.uri)


def items_uri(lake: str, date: dt.date) -> str:
    """The folder of one day's items version."""
    return resolve(lake).join("items", f"dt={date.isoformat()}").uri
