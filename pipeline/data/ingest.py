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
Everything is written under a temporary sibling prefix and moved into place only when the whole input
parsed: a bad input (missing file, wrong columns, unparsable lines) raises DataError and leaves nothing at
``out``. A re-run replaces the output.
"""

from __future__ import annotations

import io
import itertools
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, TypeAlias

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.errors import DataError
from pipeline.io.lake import resolve
from pipeline.job import Job, JobResult

Format = Literal["movielens", "netflix", "msd", "interactions"]
ArrayLike: TypeAlias = pa.Array | pa.ChunkedArray
BLOCK_BYTES = 32 << 20
TS = pa.timestamp("us", tz="UTC")
_HEADER = re.compile(rb"^(\d+):\s*$", re.MULTILINE)


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


def _events(user: ArrayLike, item: ArrayLike, weight: ArrayLike, ts: ArrayLike | None) -> pa.RecordBatch:
    cols = {"user_id": user, "item_id": item, "weight": pc.cast(weight, pa.float64())}
    if ts is not None:
        cols["event_ts"] = ts
    return pa.table(cols).combine_chunks().to_batches()[0]


def _unix(seconds: pa.Array) -> pa.Array:
    return pc.cast(pc.multiply(pc.cast(seconds, pa.int64()), 1_000_000), pa.int64()).cast(TS)


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
    for k, block in enumerate(_line_blocks(path)):
        if path.suffix == ".dat":
            block = block.replace(b"::", b"\t")  # pyarrow's CSV reader takes one-character delimiters only
        t = _csv(block, names, types, delimiter, path, expect, skip_header=path.suffix == ".csv" and k == 0)
        yield _events(t["user_id"], t["item_id"], t["rating"], _unix(t["timestamp"]))


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
        for block in _line_blocks(path):
            parts = _HEADER.split(block)  # [before, id, body, id, body, ...]
            if parts[0].strip():
                if movie is None:
                    raise DataError(f"{path} does not start with a 'MOVIEID:' line", f"pass {expect}")
                parts = [b"", str(movie).encode(), parts[0], *parts[1:]]
            for mid, body in zip(parts[1::2], parts[2::2], strict=True):
                movie = int(mid)
                if not body.strip():
                    continue
                t = _csv(body.strip() + b"\n", names, types, ",", path, expect)
                item = pa.array([movie] * t.num_rows, pa.int64())
                yield _events(t["user_id"], item, t["rating"], pc.cast(t["date"], TS))


def _msd(src: Path) -> Iterator[pa.RecordBatch]:
    path = _find(src, ("train_triplets.txt", "kaggle_visible_evaluation_triplets.txt"), "taste-profile triplets")
    types = {"user_id": pa.string(), "item_id": pa.string(), "plays": pa.int64()}
    for block in _line_blocks(path):
        t = _csv(block, ["user_id", "item_id", "plays"], types, "\t", path, "tab-separated user, song, play count triplets")
        yield _events(t["user_id"], t["item_id"], t["plays"], None)


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
    ts_col = next((c for c in ("event_ts", "timestamp") if c in names), None)
    cols = ["user_id", "item_id", *([value] if value else []), *([ts_col] if ts_col else [])]
    for batch in pf.iter_batches(batch_size=1 << 20, columns=cols):
        def ids(name: str, b: pa.RecordBatch = batch) -> pa.Array:
            a = b.column(name)
            if pa.types.is_dictionary(a.type):
                a = a.dictionary_decode()
            return pc.cast(a, pa.int64()) if pa.types.is_integer(a.type) else pc.cast(a, pa.string())
        weight = batch.column(value) if value else pa.array([1.0] * batch.num_rows)
        ts = None
        if ts_col:
            raw = batch.column(ts_col)
            ts = pc.cast(raw, TS) if pa.types.is_timestamp(raw.type) else _unix(raw)
        yield _events(ids("user_id"), ids("item_id"), weight, ts)


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
    batches = _with_dt(READERS[cfg.format](src), cfg.partition)
    first = next(batches, None)
    if first is None or first.num_rows == 0:
        raise DataError(f"{src} holds no rows", "point --src at a non-empty export")
    partitioned = "dt" in first.schema.names
    out = resolve(cfg.out)
    rows = 0

    def counted() -> Iterator[pa.RecordBatch]:
        nonlocal rows
        for x in itertools.chain([first], batches):
            if x.schema != first.schema:
                x = x.cast(first.schema)  # one schema for every block (a block of all-null weights, say)
            rows += x.num_rows
            yield x

    with tempfile.TemporaryDirectory(prefix="recsys-ingest-") as tmp:
        stage = Path(tmp) / "events"
        ds.write_dataset(
            pa.RecordBatchReader.from_batches(first.schema, counted()), stage, format="parquet",
            partitioning=ds.partitioning(pa.schema([("dt", pa.string())]), flavor="hive") if partitioned else None,
            basename_template="part-{i}.parquet", max_rows_per_file=8 << 20, max_rows_per_group=1 << 20,
            file_options=ds.ParquetFileFormat().make_write_options(compression="zstd"))
        _publish(stage, cfg.out)
    return IngestResult(uri=out.uri, rows=rows, partitioned=partitioned)


def _publish(stage: Path, out_uri: str) -> None:
    """Move a fully written staging folder to ``out`` (a local rename, or an upload to S3)."""
    out = resolve(out_uri)
    if isinstance(out.fs, pafs.LocalFileSystem):
        target = Path(out.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
        shutil.move(str(stage), tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        return
    # S3 has no rename: the input has fully parsed by now, so replace the prefix with an upload
    out.delete()
    pafs.copy_files(str(stage), out.path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=out.fs)
