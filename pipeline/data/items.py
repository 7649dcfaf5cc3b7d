"""The items contract (ARCHITECTURE.md "A changing catalog"): one row per item with its metadata.

Columns: ``item_id`` (int64, or a string id as pipeline.io.ids), ``title`` (string, nullable), ``tags``
(list<string>: genres, categories or user tags, lower-cased and stripped here), an optional free-text column
(``description`` or ``plot``) and any other typed attribute columns (lists of strings, strings, numbers), kept
as they are. ``../shared/data/*/items.parquet`` follow it.

Validation (``validate_items``), each a DataError naming the problem, the row and the fix:

- a missing ``item_id`` column, a null or invalid id, a duplicated id;
- text that is not valid UTF-8 (titles, tags, free text, string attributes): a CSV or a binary Parquet column
  with such bytes is refused, not decoded with replacement characters;
- no item with any metadata at all (every ``tags`` empty and no free text): nothing to learn from.

Empty tags on one item are a documented no-op, not an error: the item is kept with ``tags = []`` and simply
shares no tag with any other item (its tag similarity is 0; its title, text or attributes may still carry it).
Real catalogues have such items (3 anime without genres, 5,499 lastfm artists without tags), and refusing the
whole day's file for them would stop every new title; empty or blank strings inside a list are dropped too.

Publishing (``ItemsIngestJob``): the validated table goes to ``<lake>/items/dt=YYYY-MM-DD/`` through
pipeline.io.output_guard (the same staged, swapped-in-whole write as ``recsys ingest``'s events), so a bad file
leaves the day's previous version as it was. ``read_items`` reads one day's version back (or any items Parquet).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.io.items import TEXT_COLUMNS, ItemsFormat, items_uri, read_items, validate_items
from pipeline.io.lake import resolve
from pipeline.io.output_guard import replace_output
from pipeline.job import Job, JobResult

__all__ = ["ITEMS_MARKER", "TEXT_COLUMNS", "WRITER", "ItemsFormat", "ItemsIngestJob", "ItemsIngestResult", "items_uri",
           "read_items", "validate_items"]

ITEMS_MARKER = "_RECSYS_ITEMS.json"
WRITER = "recsys ingest --format items"


class ItemsIngestResult(JobResult):
    """Where the day's items went and how many."""
    uri: str
    rows: int
    items_with_tags: int


class ItemsIngestJob(Job):
    """An items file → ``<lake>/items/dt=<date>/items.parquet``, validated, replacing that day's version whole."""

    src: Path
    lake: str
    date: dt.date
    format: ItemsFormat | None = None

    def run(self) -> ItemsIngestResult:
        """Validate the source, then publish it as the day's items (nothing is written on a DataError)."""
        table = read_items(self.src, self.format)
        target = items_uri(self.lake, self.date)
        with replace_output(target, WRITER, marker=ITEMS_MARKER, sources=[self.src]) as staged:
            sink = staged.location.join("items.parquet")
            with sink.fs.open_output_stream(sink.path) as f:
                pq.write_table(table, f, compression="zstd")
            with_tags = int(pc.sum(pc.greater(pc.list_value_length(table.column("tags")), 0)).as_py() or 0)
            staged.details.update(source=str(Path(self.src).resolve()), rows=table.num_rows, date=self.date.isoformat(),
                                  items_with_tags=with_tags)
        return ItemsIngestResult(uri=resolve(target).uri, rows=table.num_rows, items_with_tags=with_tags)
