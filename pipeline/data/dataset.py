"""Load an interaction data set and turn it into a binary user × item matrix.

Steps (``load_dataset``): resolve a data set name or path -> read the Parquet file -> validate it ->
binarize with a ``BinarizeRule`` -> collapse duplicate (user, item) pairs -> keep users with at least
``min_user_interactions`` positives (one pass, as in Liang et al. 2018) -> ``Interactions``.

Documented behaviour:

- Ids may be integers (any integer width; floats that are whole numbers are cast to int64) or strings
  (external ids such as UUIDs, kept as ``str``). NaN/null ids, fractional ids, negative integer ids and
  columns that mix strings with numbers are errors.
- A rule threshold for a column the file lacks is an error; a file column the rule does not mention is
  ignored (every row counts as a positive).
- Duplicate (user, item) pairs among the positives are collapsed into one positive. They are counted in
  ``stats["duplicates_removed"]`` and reported with a warning; they are not an error.
- The user filter is one pass: items are the ones the remaining users interacted with; dropping items
  does not trigger another round of user filtering.
- Order is deterministic: rows are users sorted by external id, columns are items sorted by external id.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp
from pydantic import BaseModel, ConfigDict

from pipeline.errors import DataError

logger = logging.getLogger(__name__)

ID_COLUMNS = ("user_id", "item_id")
VALUE_COLUMNS = ("rating", "weight")
INTERACTIONS_FILE = "interactions.parquet"
_NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")
_INT64_LIMIT = float(2**63)


class BinarizeRule(BaseModel):
    """How interactions become positives. ``None`` means: no threshold on that column."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_rating: float | None = None  # keep rows with rating >= min_rating (needs a `rating` column)
    min_weight: float | None = None  # keep rows with weight >= min_weight (needs a `weight` column)


@dataclass(frozen=True, eq=False)
class Interactions:
    """A binary users × items matrix with its external ids.

    ``matrix`` is CSR, float32, every stored value 1.0, sorted indices, no duplicates.
    ``user_ids[r]`` is the external id of row r; ``item_ids[c]`` the external id of column c.
    """

    matrix: sp.csr_matrix
    user_ids: np.ndarray
    item_ids: np.ndarray
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def n_users(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def n_items(self) -> int:
        return int(self.matrix.shape[1])


# --------------------------------------------------------------------------------------------------
# Resolving and reading
# --------------------------------------------------------------------------------------------------


def available_datasets(data_dir: Path) -> list[str]:
    """Names of the folders in ``data_dir`` that hold an ``interactions.parquet``, sorted."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        return []
    return sorted(p.name for p in data_dir.iterdir() if (p / INTERACTIONS_FILE).is_file())


def _available_hint(data_dir: Path) -> str:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        return (
            f"the data folder {data_dir} does not exist: point RECSYS_DATA_DIR (or the data_dir setting) "
            "at the folder that holds <name>/interactions.parquet, or pass a path to a Parquet file"
        )
    names = available_datasets(data_dir)
    if not names:
        return (
            f"the data folder {data_dir} holds no <name>/{INTERACTIONS_FILE}: put the data set there "
            "or pass a path to a Parquet file"
        )
    return f"use one of the data sets in {data_dir}: {', '.join(names)}; or pass a path to a Parquet file"


def resolve_dataset(name_or_path: str, data_dir: Path) -> Path:
    """Turn a data set name or a path into the path of an interactions Parquet file.

    - A NAME (``^[A-Za-z0-9._-]+$``, not ``.``/``..``) that exists as ``data_dir/NAME/interactions.parquet``
      resolves to that file.
    - Otherwise an existing ``.parquet`` file, or an existing folder with an ``interactions.parquet``,
      is used as is. Such paths are relative to the working directory, never to ``data_dir``: a name
      cannot reach outside ``data_dir`` (``..`` and separators make it a path, not a name).
    - Anything else is a ``DataError`` that lists the data sets available in ``data_dir``.
    """
    data_dir = Path(data_dir)
    text = str(name_or_path).strip()
    if not text:
        raise DataError("no data set given (empty name)", _available_hint(data_dir))
    if "\x00" in text:
        raise DataError(f"data set name {text!r} contains a NUL byte", _available_hint(data_dir))

    is_name = bool(_NAME_RE.fullmatch(text)) and text not in (".", "..")
    if is_name:
        candidate = data_dir / text / INTERACTIONS_FILE
        if candidate.is_file():
            return candidate

    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".parquet":
            raise DataError(
                f"{path} is not a Parquet file (suffix {path.suffix or 'none'!r})",
                "export the interactions as Parquet (columns user_id, item_id[, rating][, weight]) "
                "and pass the .parquet file",
            )
        return path
    if path.is_dir():
        inner = path / INTERACTIONS_FILE
        if inner.is_file():
            return inner
        if is_name:  # a bare name that happens to be a folder in the working directory
            raise DataError(f"unknown data set {text!r}", _available_hint(data_dir))
        raise DataError(
            f"folder {path} has no {INTERACTIONS_FILE}",
            f"pass the Parquet file itself or a folder that contains {INTERACTIONS_FILE}; or "
            + _available_hint(data_dir),
        )

    if is_name:
        raise DataError(f"unknown data set {text!r}", _available_hint(data_dir))
    raise DataError(
        f"{text!r} is neither a data set name (letters, digits, '.', '_', '-'; no path separators or "
        "'..') nor an existing Parquet file or folder",
        _available_hint(data_dir),
    )


def read_interactions(path: Path) -> pd.DataFrame:
    """Read ``user_id``, ``item_id`` and, when present, ``rating``/``weight``; other columns are dropped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"interactions file {path} does not exist", "check the path or the data set name")
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(
            f"{path} is not a readable Parquet file ({type(err).__name__}: {err})",
            "re-export the interactions as Parquet; an empty or truncated file usually means the export "
            "failed part way",
        ) from err
    found = list(schema.names)
    missing = [c for c in ID_COLUMNS if c not in found]
    if missing:
        raise DataError(
            f"{path} lacks column(s) {', '.join(missing)}; columns found: {', '.join(found) or 'none'}",
            "rename the user and item columns to user_id and item_id",
        )
    wanted = [c for c in (*ID_COLUMNS, *VALUE_COLUMNS) if c in found]
    try:
        table = pq.read_table(path, columns=wanted)
    except (pa.ArrowException, OSError) as err:
        raise DataError(
            f"cannot read columns {wanted} from {path} ({type(err).__name__}: {err})",
            "re-export the interactions as Parquet",
        ) from err
    # Dictionary-encoded columns would become pandas categoricals; decode them to plain values.
    columns = {}
    for name in wanted:
        col = table.column(name)
        if pa.types.is_dictionary(col.type):
            col = pa.chunked_array([c.dictionary_decode() for c in col.chunks], type=col.type.value_type)
        columns[name] = col
    df = pa.table(columns).to_pandas()
    logger.info("read %d rows from %s (columns %s)", len(df), path, ", ".join(wanted))
    return df


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def _int_ids(name: str, values: np.ndarray) -> np.ndarray:
    ids = values.astype(np.int64, copy=False)
    n_neg = int((ids < 0).sum())
    if n_neg:
        raise DataError(
            f"column {name} has {n_neg} negative id(s) (smallest {int(ids.min())})",
            f"ids must be non-negative integers: remap {name} (e.g. to 0..n-1) before loading",
        )
    return ids


def _float_ids(name: str, values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64, copy=False)
    n_nan = int(np.isnan(values).sum())
    if n_nan:
        raise DataError(
            f"column {name} has {n_nan} missing (NaN/null) id(s)",
            f"drop the rows without a {name} or fill in the ids before loading",
        )
    bad = ~np.isfinite(values) | (values != np.floor(values)) | (np.abs(values) >= _INT64_LIMIT)
    n_bad = int(bad.sum())
    if n_bad:
        example = values[bad][0]
        raise DataError(
            f"column {name} has {n_bad} non-integer id(s) (e.g. {example!r})",
            f"ids must be int64 (or strings): write {name} as integers, not fractional floats",
        )
    return _int_ids(name, values)


def _object_ids(name: str, series: pd.Series) -> np.ndarray:
    values = series.to_numpy(dtype=object)
    is_str = np.fromiter((isinstance(v, str) for v in values), dtype=bool, count=len(values))
    if is_str.all():
        n_empty = int(sum(1 for v in values if not v.strip()))
        if n_empty:
            raise DataError(
                f"column {name} has {n_empty} empty string id(s)",
                f"drop the rows without a {name} or fill in the ids before loading",
            )
        return values
    if is_str.any():
        example = next(v for v in values if not isinstance(v, str))
        raise DataError(
            f"column {name} mixes strings with other values (e.g. {example!r})",
            f"ids must be all int64 or all strings: cast {name} to one type before loading",
        )
    if any(isinstance(v, bool | np.bool_) for v in values):
        raise DataError(
            f"column {name} holds booleans", f"ids must be int64 (or strings): write {name} as integers"
        )
    try:
        numeric = pd.to_numeric(pd.Series(values), errors="raise").to_numpy()
    except (TypeError, ValueError) as err:
        raise DataError(
            f"column {name} has values that are neither integers nor strings ({err})",
            f"ids must be int64 (or strings): write {name} as integers",
        ) from err
    if numeric.dtype.kind in "iu":
        return _int_ids(name, numeric)
    return _float_ids(name, numeric)


def _validate_ids(name: str, series: pd.Series) -> np.ndarray:
    n_null = int(series.isna().sum())
    if n_null:
        raise DataError(
            f"column {name} has {n_null} missing (NaN/null) id(s)",
            f"drop the rows without a {name} or fill in the ids before loading",
        )
    dtype = series.dtype
    if pd.api.types.is_bool_dtype(dtype):
        raise DataError(
            f"column {name} is boolean", f"ids must be int64 (or strings): write {name} as integers"
        )
    if pd.api.types.is_integer_dtype(dtype):
        return _int_ids(name, series.to_numpy(dtype=np.int64))
    if pd.api.types.is_float_dtype(dtype):
        return _float_ids(name, series.to_numpy(dtype=np.float64))
    if isinstance(dtype, pd.CategoricalDtype) or dtype.kind == "O" or pd.api.types.is_string_dtype(dtype):
        return _object_ids(name, series.astype(object))
    raise DataError(
        f"column {name} has type {dtype}, which cannot hold ids",
        f"ids must be int64 (or strings): write {name} as integers",
    )


def _validate_values(name: str, series: pd.Series) -> np.ndarray:
    if pd.api.types.is_bool_dtype(series.dtype) or not pd.api.types.is_numeric_dtype(series.dtype):
        raise DataError(
            f"column {name} has type {series.dtype}, not a number",
            f"write {name} as a float or integer column, or drop the column if it is not a {name}",
        )
    n_null = int(series.isna().sum())
    if n_null:
        raise DataError(
            f"column {name} has {n_null} missing (NaN/null) value(s)",
            f"drop those rows or fill in {name} before loading (or drop the {name} column if unused)",
        )
    return series.to_numpy(dtype=np.float64)


def validate_interactions(df: pd.DataFrame) -> pd.DataFrame:
    """Check an interactions frame and return a clean copy.

    The result has ``user_id`` and ``item_id`` (int64, or ``str`` objects for string ids) and, when
    present, ``rating``/``weight`` as float64; other columns are dropped. Raises ``DataError``.
    """
    found = [str(c) for c in df.columns]
    missing = [c for c in ID_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(
            f"interactions lack column(s) {', '.join(missing)}; columns found: {', '.join(found) or 'none'}",
            "rename the user and item columns to user_id and item_id",
        )
    if len(df) == 0:
        raise DataError(
            "the interactions have zero rows (the file has a schema but no data)",
            "check the export that wrote the file, or point at a data set with interactions",
        )
    out = {name: _validate_ids(name, df[name]) for name in ID_COLUMNS}
    for name in VALUE_COLUMNS:
        if name in df.columns:
            out[name] = _validate_values(name, df[name])
    return pd.DataFrame(out)


# --------------------------------------------------------------------------------------------------
# Binarize, dedupe, filter
# --------------------------------------------------------------------------------------------------


def _binarize_mask(df: pd.DataFrame, rule: BinarizeRule) -> np.ndarray:
    keep = np.ones(len(df), dtype=bool)
    for column, threshold, field_name in (
        ("rating", rule.min_rating, "min_rating"),
        ("weight", rule.min_weight, "min_weight"),
    ):
        if threshold is None:
            if column in df.columns:
                logger.info(
                    "no %s in the rule: every row counts as a positive whatever its %s", field_name, column
                )
            continue
        if column not in df.columns:
            raise DataError(
                f"the binarize rule sets {field_name}={threshold} but the data has no {column} column "
                f"(columns: {', '.join(map(str, df.columns))})",
                f"remove {field_name} from the rule, or load a data set that has a {column} column",
            )
        keep &= df[column].to_numpy() >= threshold
    return keep


def prepare(df: pd.DataFrame, rule: BinarizeRule, min_user_interactions: int = 5) -> Interactions:
    """Validate, binarize, dedupe and filter ``df`` into an ``Interactions`` matrix (see module doc)."""
    if (
        isinstance(min_user_interactions, bool)
        or int(min_user_interactions) != min_user_interactions
        or min_user_interactions < 1
    ):
        raise DataError(
            f"min_user_interactions must be a positive integer, got {min_user_interactions!r}",
            "set min_user_interactions to 1 or more (the protocol uses 5)",
        )
    min_user_interactions = int(min_user_interactions)
    df = validate_interactions(df)
    rows_read = len(df)

    keep = _binarize_mask(df, rule)
    rows_pos = int(keep.sum())
    if rows_pos == 0:
        raise DataError(
            f"no interaction passes the binarize rule {rule.model_dump(exclude_none=True)} "
            f"({rows_read} rows read)",
            "lower the min_rating/min_weight threshold",
        )
    users_raw = df["user_id"].to_numpy()[keep]
    items_raw = df["item_id"].to_numpy()[keep]

    # Codes in sorted external-id order (np.unique sorts), so the result is deterministic.
    user_vocab, u = np.unique(users_raw, return_inverse=True)
    item_vocab, i = np.unique(items_raw, return_inverse=True)
    n_items_all = len(item_vocab)
    keys = np.unique(u.astype(np.int64) * n_items_all + i.astype(np.int64))  # sorted by (user, item)
    duplicates = rows_pos - len(keys)
    if duplicates:
        logger.warning(
            "collapsed %d duplicate (user_id, item_id) pair(s) into single positives (%d -> %d)",
            duplicates,
            rows_pos,
            len(keys),
        )
    u = keys // n_items_all
    i = keys % n_items_all

    per_user = np.bincount(u, minlength=len(user_vocab))
    user_ok = per_user >= min_user_interactions
    n_users_ok = int(user_ok.sum())
    users_dropped = len(user_vocab) - n_users_ok
    if n_users_ok == 0:
        raise DataError(
            f"no user has at least min_user_interactions={min_user_interactions} positives: all "
            f"{len(user_vocab)} user(s) had fewer (most: {int(per_user.max())})",
            "lower min_user_interactions or the binarize threshold, or use a larger data set",
        )
    if users_dropped:
        logger.info(
            "dropped %d of %d users with fewer than %d positives",
            users_dropped,
            len(user_vocab),
            min_user_interactions,
        )
    row_keep = user_ok[u]
    u, i = u[row_keep], i[row_keep]
    # Renumber users and items among the survivors, preserving sorted external-id order.
    new_user = np.cumsum(user_ok) - 1
    item_used = np.zeros(n_items_all, dtype=bool)
    item_used[i] = True
    new_item = np.cumsum(item_used) - 1
    rows = new_user[u]
    cols = new_item[i]
    n_users, n_items = n_users_ok, int(item_used.sum())

    # (rows, cols) are sorted by (row, col) and unique, so the CSR arrays can be built directly.
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n_users), out=indptr[1:])
    index_dtype = np.int32 if max(len(cols), n_items) < 2**31 else np.int64
    matrix = sp.csr_matrix(
        (np.ones(len(cols), dtype=np.float32), cols.astype(index_dtype), indptr.astype(index_dtype)),
        shape=(n_users, n_items),
    )
    matrix.has_sorted_indices = True

    stats = {
        "rows_read": rows_read,
        "rows_after_binarize": rows_pos,
        "duplicates_removed": int(duplicates),
        "users_before_filter": len(user_vocab),
        "users_dropped": int(users_dropped),
        "items_before_filter": int(n_items_all),
        "items_dropped": int(n_items_all - n_items),
        "users": n_users,
        "items": n_items,
        "nnz": int(matrix.nnz),
        "min_user_interactions": min_user_interactions,
        "rule": rule.model_dump(),
    }
    logger.info(
        "prepared %d users x %d items, %d positives (density %.4g)",
        n_users,
        n_items,
        matrix.nnz,
        matrix.nnz / max(1, n_users * n_items),
    )
    return Interactions(
        matrix=matrix,
        user_ids=user_vocab[user_ok],
        item_ids=item_vocab[item_used],
        stats=stats,
    )


def load_dataset(
    name_or_path: str | Path,
    data_dir: Path,
    rule: BinarizeRule,
    min_user_interactions: int = 5,
) -> Interactions:
    """Resolve, read, validate, binarize, dedupe and filter a data set (see module doc)."""
    path = resolve_dataset(str(name_or_path), Path(data_dir))
    df = read_interactions(path)
    interactions = prepare(df, rule, min_user_interactions=min_user_interactions)
    interactions.stats["path"] = str(path)
    return interactions
