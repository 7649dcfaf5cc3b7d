"""Convert raw data sets into the events contract (ARCHITECTURE.md): user_id, item_id, event_ts?, weight.

Formats (``IngestJob.format``):

- ``movielens``: ``ratings.csv`` (header userId,movieId,rating,timestamp), ``ratings.dat`` (``::``-separated)
  or ``u.data`` (tab-separated, ML-100k); ``src`` is the file or a folder holding one of them.
- ``netflix``: Netflix Prize ``mv_*.txt`` files (first line ``MOVIEID:``, then ``user,rating,YYYY-MM-DD``; the
  ``combined_data_*.txt`` files, several movies per file, parse the same way); ``src`` a file or a folder.
- ``msd``: Million Song taste-profile triplets (tab-separated user, song, play count; string ids, no time).
- ``interactions``: Parquet with user_id, item_id and optionally rating or weight (-> weight) and
  timestamp (unix seconds) or event_ts (-> event_ts), like ../shared/data/*/interactions.parquet.

Output: with timestamps, Parquet hive-partitioned by ``dt=YYYY-MM-DD`` (UTC day of event_ts), unless
``partition=False``; without timestamps (MSD, most of ../shared/data), one folder of Parquet files, no ``dt=``.
Ids are int64, or strings where the source has string ids; event_ts is timestamp[us, UTC]; weight float64.

Inputs are streamed (blocks of lines / Parquet record batches), so memory stays bounded whatever the size.
Ids follow pipeline.io.ids (int64, or strings of 1-256 characters without control characters: unicode and '/'
are fine); event times must lie in years 1-9999 (unix seconds, not milliseconds). A violating value is a
DataError naming it and its row (1-based, data rows of that file).

Everything is written under a temporary sibling of ``out`` and swapped into place only when the whole input
parsed (pipeline.io.output_guard): a bad input (missing file, wrong columns, unparsable lines, a bad id) raises
DataError and leaves ``out`` as it was. ``out`` must be new, empty or an earlier ingest's output (its
``_RECSYS_EVENTS.json`` marker), and must not contain the source or lie inside it; a re-run replaces it.
"""

from __future__ import annotations

import io
import itertools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, TypeAlias

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pipeline.errors import DataError
from pipeline.io.ids import INT64_MAX, MAX_STRING_ID, string_id_problem
from pipeline.io.lake import resolve
from pipeline.io.output_guard import replace_output
from pipeline.job import Job, JobResult

Format = Literal["movielens", "netflix", "msd", "interactions"]
ArrayLike: TypeAlias = pa.Array | pa.ChunkedArray
BLOCK_BYTES = 32 << 20
TS = pa.timestamp("us", tz="UTC")
_HEADER = re.compile(rb"^(\d+):\s*$", re.MULTILINE)
WRITER = "recsys ingest"
# microseconds since 1970 of 0001-01-01T00:00 and 9999-12-31T23:59:59.999999: what Spark and Python dates hold
TS_MIN_US, TS_MAX_US = -62_135_596_800_000_000, 253_402_300_799_999_999
_CONTROL = r"[\x{0}-\x{1f}\x{7f}-\x{9f}]"  # Unicode category Cc, as pipeline.io.ids


class IngestJob(Job):
    """A public data set's files → the events contract (Parquet, dt= partitions when it has timestamps)."""

    format: Format
    src: Path
    out: str
    partition: bool = True  # dt=YYYY-MM-DD partitions when the data has timestamps

    def run(self) -> IngestResult:
        """Convert the source and write the events under OUT."""
        return ingest(self)


class IngestResult(JobResult):
    """Where the events went, how many rows, and whether they are dt= partitioned."""
    uri: str
    rows: int
    partitioned: bool


def _bad(path: Path, err: Exception, expect: str) -> DataError:
    return DataError(f"cannot parse {path}: {str(err).splitlines()[0]}", f"check that it is {expect}; fix or drop the bad lines")


def _line_blocks(path: Path) -> Iterator[bytes]:
    """Whole lines, about BLOCK_BYTES at a time."""
    with open(path, "rb") as f:
        while True:
            block = f.readlines(BLOCK_BYTES)
            if not block:
                return
            yield b"".join(block)


def _csv(data: bytes, names: list[str], types: dict[str, pa.DataType], delimiter: str, path: Path, expect: str,
         skip_header: bool = False) -> pa.Table:
    try:
        return pacsv.read_csv(io.BytesIO(data),
                              read_options=pacsv.ReadOptions(column_names=names, skip_rows=int(skip_header)),
                              parse_options=pacsv.ParseOptions(delimiter=delimiter),
                              convert_options=pacsv.ConvertOptions(column_types=types, timestamp_parsers=["%Y-%m-%d"]))
    except pa.ArrowInvalid as err:
        raise _bad(path, err, expect) from err


def _first(mask: ArrayLike) -> int | None:
    """Index of the first true value of a boolean array (nulls count as false), or None."""
    idx = pc.index(pc.fill_null(mask, False), True).as_py()
    return None if idx is None or idx < 0 else int(idx)


def _check_ids(values: ArrayLike, name: str, path: Path, row0: int) -> None:
    """Every id satisfies pipeline.io.ids; else a DataError naming the first bad one and its row."""
    what = name.replace("_", " ")
    at = _first(pc.is_null(values))
    if at is not None:
        raise DataError(f"{name} is missing at row {row0 + at + 1} of {path}",
                        f"fill in or drop the rows without a {what}")
    if not pa.types.is_string(values.type):
        return  # int64: valid by type
    try:
        values.validate(full=True)
    except pa.ArrowInvalid as err:
        raise DataError(f"{name} of {path} holds text that is not valid UTF-8 (rows {row0 + 1}-{row0 + len(values)})",
                        f"re-export the file with UTF-8 {what}s") from err
    length = pc.utf8_length(values)
    suspect = pc.or_(pc.or_(pc.equal(length, 0), pc.greater(length, MAX_STRING_ID)),
                     pc.match_substring_regex(values, _CONTROL))
    for k in pc.indices_nonzero(pc.fill_null(suspect, False)).to_pylist():
        value = values[k].as_py()
        problem = string_id_problem(value)
        if problem:
            raise DataError(f"invalid {name} {value[:40]!r} at row {row0 + k + 1} of {path}: {problem}",
                            f"use {what}s of 1-{MAX_STRING_ID} characters without control characters (fix or drop "
                            f"that row)")


def _check_ts(ts: ArrayLike, path: Path, row0: int) -> None:
    """Event times exist and lie in years 1-9999 (what Spark and Python dates can hold)."""
    at = _first(pc.is_null(ts))
    if at is not None:
        raise DataError(f"the event time is missing at row {row0 + at + 1} of {path}",
                        "fill it in, or drop the time column (then the events are written without dt= partitions)")
    us = pc.cast(ts, pa.int64())
    at = _first(pc.or_(pc.less(us, TS_MIN_US), pc.greater(us, TS_MAX_US)))
    if at is not None:
        raise DataError(f"the event time at row {row0 + at + 1} of {path} lies outside the years 1-9999",
                        "store unix seconds (not milliseconds) or a Parquet timestamp, and fix or drop that row")


def _events(user: ArrayLike, item: ArrayLike, weight: ArrayLike, ts: ArrayLike | None, path: Path,
            row0: int) -> pa.RecordBatch:
    """One block of the events contract, after checking its ids and times (row0: rows of `path` before it)."""
    _check_ids(user, "user_id", path, row0)
    _check_ids(item, "item_id", path, row0)
    cols = {"user_id": user, "item_id": item, "weight": pc.cast(weight, pa.float64())}
    if ts is not None:
        _check_ts(ts, path, row0)
        cols["event_ts"] = ts
    return pa.table(cols).combine_chunks().to_batches()[0]


def _unix(seconds: ArrayLike, path: Path, row0: int) -> ArrayLike:
    """Integer unix seconds -> timestamp[us, UTC]; an overflow (milliseconds taken as seconds) is a DataError."""
    try:
        return pc.multiply_checked(pc.cast(seconds, pa.int64()), 1_000_000).cast(TS)
    except pa.ArrowInvalid as err:
        raise DataError(f"unix times in rows {row0 + 1}-{row0 + len(seconds)} of {path} overflow ({err})",
                        "store unix seconds (not milliseconds or nanoseconds) or a Parquet timestamp") from err


def _find(src: Path, names: tuple[str, ...], what: str) -> Path:
    if src.is_file():
        return src
    if src.is_dir():
        for n in names:
            if (src / n).is_file():
                return src / n
    raise DataError(f"no {what} file at {src} (looked for {', '.join(names)})", f"pass the {what} file or its folder with --src")


def _movielens(src: Path) -> Iterator[pa.RecordBatch]:
    path = _find(src, ("ratings.csv", "ratings.dat", "u.data"), "MovieLens ratings")
    names = ["user_id", "item_id", "rating", "timestamp"]
    types = {"user_id": pa.int64(), "item_id": pa.int64(), "rating": pa.float64(), "timestamp": pa.int64()}
    expect = "MovieLens ratings (user, movie, rating, unix timestamp)"
    if path.suffix == ".csv":
        with open(path, "rb") as f:
            header = f.readline().decode(errors="replace").strip()
        if header.lower().replace(" ", "") != "userid,movieid,rating,timestamp":
            raise DataError(f"{path} has header {header[:80]!r}, not userId,movieId,rating,timestamp",
                            "pass a MovieLens ratings.csv (or use --format interactions for other layouts)")
    delimiter = "," if path.suffix == ".csv" else "\t"
    row = 0
    for k, block in enumerate(_line_blocks(path)):
        if path.suffix == ".dat":
            block = block.replace(b"::", b"\t")  # pyarrow's CSV reader takes one-character delimiters only
        t = _csv(block, names, types, delimiter, path, expect, skip_header=path.suffix == ".csv" and k == 0)
        yield _events(t["user_id"], t["item_id"], t["rating"], _unix(t["timestamp"], path, row), path, row)
        row += t.num_rows


def _netflix(src: Path) -> Iterator[pa.RecordBatch]:
    files = [src] if src.is_file() else sorted([*src.glob("mv_*.txt"), *src.glob("combined_data_*.txt")]) if src.is_dir() else []
    if not files:
        raise DataError(f"no Netflix Prize files at {src}",
                        "pass a folder of mv_*.txt (training_set) or one such file with --src")
    names = ["user_id", "rating", "date"]
    types = {"user_id": pa.int64(), "rating": pa.float64(), "date": pa.timestamp("s")}
    expect = "a Netflix Prize file ('MOVIEID:' line, then 'user,rating,YYYY-MM-DD' lines)"
    movie: int | None = None
    for path in files:
        row = 0  # data lines of this file (the MOVIEID: lines are not counted)
        for block in _line_blocks(path):
            parts = _HEADER.split(block)  # [before, id, body, id, body, ...]
            if parts[0].strip():
                if movie is None:
                    raise DataError(f"{path} does not start with a 'MOVIEID:' line", f"pass {expect}")
                parts = [b"", str(movie).encode(), parts[0], *parts[1:]]
            for mid, body in zip(parts[1::2], parts[2::2], strict=True):
                movie = int(mid)
                if movie > INT64_MAX:
                    raise DataError(f"movie id {mid.decode()[:40]} in {path} is outside the int64 range",
                                    f"pass {expect}")
                if not body.strip():
                    continue
                t = _csv(body.strip() + b"\n", names, types, ",", path, expect)
                item = pa.array([movie] * t.num_rows, pa.int64())
                yield _events(t["user_id"], item, t["rating"], pc.cast(t["date"], TS), path, row)
                row += t.num_rows


def _msd(src: Path) -> Iterator[pa.RecordBatch]:
    path = _find(src, ("train_triplets.txt", "kaggle_visible_evaluation_triplets.txt"), "taste-profile triplets")
    types = {"user_id": pa.string(), "item_id": pa.string(), "plays": pa.int64()}
    row = 0
    for block in _line_blocks(path):
        t = _csv(block, ["user_id", "item_id", "plays"], types, "\t", path, "tab-separated user, song, play count triplets")
        yield _events(t["user_id"], t["item_id"], t["plays"], None, path, row)
        row += t.num_rows


def _interaction_ids(b: pa.RecordBatch, name: str, path: Path, row0: int) -> pa.Array:
    """An id column as int64 (any integer width; whole floats) or string; anything else is a DataError."""
    a = b.column(name)
    if pa.types.is_dictionary(a.type):
        a = a.dictionary_decode()
    t = a.type
    if pa.types.is_unsigned_integer(t):
        at = _first(pc.greater(a, pa.scalar(INT64_MAX, pa.uint64())))
        if at is not None:
            raise DataError(f"{name} {a[at].as_py()} at row {row0 + at + 1} of {path} is outside the int64 range",
                            f"write {name} as int64 or as strings")
    if pa.types.is_integer(t):
        return pc.cast(a, pa.int64())
    if pa.types.is_floating(t):
        whole = pc.and_(pc.is_finite(a), pc.and_(pc.equal(pc.floor(a), a), pc.less(pc.abs(a), 2.0**63)))
        at = _first(pc.and_(pc.is_valid(a), pc.invert(whole)))
        if at is not None:
            raise DataError(f"{name} {a[at].as_py()!r} at row {row0 + at + 1} of {path} is not an integer",
                            f"write {name} as int64 or as strings")
        return pc.cast(a, pa.int64())
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return pc.cast(a, pa.string())
    raise DataError(f"{name} in {path} has type {t}", f"write {name} as int64 or as strings")


def _interaction_ts(raw: pa.Array, name: str, path: Path, row0: int) -> pa.Array:
    """A time column as timestamp[us, UTC]: a timestamp (naive ones taken as UTC) or integer unix seconds."""
    if pa.types.is_timestamp(raw.type):
        try:  # nanoseconds lose their last digits (no overflow possible); s/ms/us must fit (checked cast)
            return pc.cast(raw, TS, safe=raw.type.unit != "ns")
        except pa.ArrowInvalid as err:
            raise DataError(f"{name} in rows {row0 + 1}-{row0 + len(raw)} of {path} does not fit a microsecond "
                            f"timestamp ({err})", f"store {name} as a timestamp in years 1-9999") from err
    if pa.types.is_integer(raw.type):
        return _unix(raw, path, row0)
    raise DataError(f"{name} in {path} has type {raw.type}, not a timestamp or integer unix seconds",
                    f"store {name} as a Parquet timestamp or as integer unix seconds")


def _interactions(src: Path) -> Iterator[pa.RecordBatch]:
    path = src / "interactions.parquet" if src.is_dir() else src
    if not path.is_file():
        raise DataError(f"no interactions Parquet at {src}", "pass a .parquet file or a folder holding interactions.parquet")
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path} is not a readable Parquet file ({err})", "re-export it as Parquet") from err
    names = pf.schema_arrow.names
    missing = [c for c in ("user_id", "item_id") if c not in names]
    if missing:
        raise DataError(f"{path} lacks column(s) {', '.join(missing)} (columns: {', '.join(names)})",
                        "rename the user and item columns to user_id and item_id")
    value = next((c for c in ("weight", "rating") if c in names), None)
    if value is not None:
        vtype = pf.schema_arrow.field(value).type
        if not (pa.types.is_integer(vtype) or pa.types.is_floating(vtype) or pa.types.is_decimal(vtype)):
            raise DataError(f"{value} in {path} has type {vtype}, not a number",
                            f"write {value} as a number, or drop the column (every event then counts 1)")
    ts_col = next((c for c in ("event_ts", "timestamp") if c in names), None)
    cols = ["user_id", "item_id", *([value] if value else []), *([ts_col] if ts_col else [])]
    row = 0
    batches = pf.iter_batches(batch_size=1 << 20, columns=cols)
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"cannot read {path} after row {row} ({str(err).splitlines()[0][:200]})",
                            "re-export it as Parquet (the file is damaged)") from err
        if batch is None:
            return
        weight = batch.column(value) if value else pa.array([1.0] * batch.num_rows)
        ts = _interaction_ts(batch.column(ts_col), ts_col, path, row) if ts_col else None
        yield _events(_interaction_ids(batch, "user_id", path, row), _interaction_ids(batch, "item_id", path, row),
                      weight, ts, path, row)
        row += batch.num_rows


READERS = {"movielens": _movielens, "netflix": _netflix, "msd": _msd, "interactions": _interactions}


def _with_dt(batches: Iterator[pa.RecordBatch], partition: bool) -> Iterator[pa.RecordBatch]:
    for b in batches:
        if partition and "event_ts" in b.schema.names:
            day = pc.strftime(b.column("event_ts"), format="%Y-%m-%d")
            b = pa.RecordBatch.from_arrays([*b.columns, day], names=[*b.schema.names, "dt"])
        yield b


def ingest(cfg: IngestJob) -> IngestResult:
    """The ingest job's work (IngestJob.run): read the source format, write the events contract."""
    src = Path(cfg.src).expanduser()
    if not src.exists():
        raise DataError(f"source {src} does not exist", "check --src")
    out = resolve(cfg.out)
    rows = 0
    with replace_output(cfg.out, WRITER, sources=[src]) as staged:  # refuses a foreign --out before reading
        batches = _with_dt(READERS[cfg.format](src), cfg.partition)
        first = next(batches, None)
        if first is None or first.num_rows == 0:
            raise DataError(f"{src} holds no rows", "point --src at a non-empty export")
        partitioned = "dt" in first.schema.names

        def counted() -> Iterator[pa.RecordBatch]:
            nonlocal rows
            for x in itertools.chain([first], batches):
                if x.schema != first.schema:
                    x = x.cast(first.schema)  # one schema for every block (a block of all-null weights, say)
                rows += x.num_rows
                yield x

        stage = staged.location
        ds.write_dataset(
            pa.RecordBatchReader.from_batches(first.schema, counted()), stage.path, filesystem=stage.fs,
            format="parquet",
            partitioning=ds.partitioning(pa.schema([("dt", pa.string())]), flavor="hive") if partitioned else None,
            basename_template="part-{i}.parquet", max_rows_per_file=8 << 20, max_rows_per_group=1 << 20,
            file_options=ds.ParquetFileFormat().make_write_options(compression="zstd"),
            existing_data_behavior="overwrite_or_ignore")  # the staging folder is new and empty
        staged.details.update(format=cfg.format, source=str(src.resolve()), rows=rows, partitioned=partitioned)
    return IngestResult(uri=out.uri, rows=rows, partitioned=partitioned)
