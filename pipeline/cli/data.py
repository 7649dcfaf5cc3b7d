"""`recsys ingest | synth | build-matrix`: the weekly data build's sub-commands (heavy imports inside)."""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path
from typing import Any


def _date(text: str) -> dt.date:
    from pipeline.errors import DataError
    from pipeline.io.dates import parse_date

    try:  # the one strict parser: YYYY-MM-DD only (fromisoformat alone also takes 20240105 or 2024-W01-5)
        return parse_date(text)
    except DataError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _count_or_fraction(text: str) -> int | float:
    value = float(text)
    return int(value) if value >= 1 and value.is_integer() else value


def register(sub: Any) -> None:
    i = sub.add_parser("ingest", help="convert MovieLens / Netflix / MSD / interaction Parquet into events, or an "
                                      "items file into the day's catalogue metadata")
    i.add_argument("--format", required=True, choices=["movielens", "netflix", "msd", "interactions", "items"],
                   help="the source's layout (items: Parquet, or CSV with |-separated tags; pipeline/data/items.py)")
    i.add_argument("--src", type=Path, required=True, help="the source file or folder")
    i.add_argument("--out", required=True, help="events URI (local folder or s3://bucket/prefix); for items, the "
                                                "lake root: writes OUT/items/dt=DATE/")
    i.add_argument("--date", type=_date, default=None, help="items only: the day this catalogue version is for")
    i.add_argument("--no-partition", action="store_true", help="one folder even when the data has timestamps")
    i.set_defaults(func=cmd_ingest)

    s = sub.add_parser("synth", help="synthetic events over days (dt= partitions), deterministic for a seed")
    s.add_argument("--users", type=int, required=True, help="number of users")
    s.add_argument("--items", type=int, required=True, help="catalog size")
    s.add_argument("--days", type=int, required=True, help="days of events, one dt= partition each")
    s.add_argument("--out", required=True, help="events URI (local folder or s3://bucket/prefix)")
    s.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same events")
    s.add_argument("--start", type=_date, default=dt.date(2024, 1, 1), help="first day (YYYY-MM-DD)")
    s.add_argument("--mean-items", type=float, default=30.0, help="mean distinct items per user")
    s.set_defaults(func=cmd_synth)

    b = sub.add_parser("build-matrix", help="events in a window -> a matrix snapshot under LAKE/snapshots/")
    b.add_argument("--events", required=True, help="events URI (dt= partitions or flat Parquet; local or s3://)")
    b.add_argument("--as-of", type=_date, required=True, help="last day of the window (YYYY-MM-DD)")
    b.add_argument("--window-days", type=int, default=28, help="days in the window, AS_OF included")
    b.add_argument("--out", required=True, help="lake URI; the snapshot goes to OUT/snapshots/as_of=DATE")
    b.add_argument("--spark-master", default="local[*]", help="Spark master URL")
    b.add_argument("--min-user-interactions", type=int, default=5, help="drop users with fewer positives")
    b.add_argument("--min-item-interactions", type=int, default=1, help="drop items with fewer positives")
    b.add_argument("--binarize", default="weight>0", help="'weight>=4' (MovieLens ratings), 'weight>0' or 'any'")
    b.add_argument("--n-valid", type=_count_or_fraction, default=0.1, help="a user count or a fraction (<1)")
    b.add_argument("--n-test", type=_count_or_fraction, default=0.1, help="a user count or a fraction (<1)")
    b.add_argument("--seed", type=int, default=0, help="seed of the user split and fold-in")
    b.add_argument("--shuffle-partitions", type=int, default=8, help="spark.sql.shuffle.partitions")
    b.add_argument("--dq-max-drop", type=float, default=0.5, help="largest allowed drop vs the previous snapshot")
    b.add_argument("--dq-max-duplicates", type=float, default=0.5, help="largest allowed duplicate-event fraction")
    b.add_argument("--dq-max-out-of-window", type=float, default=0.001,
                   help="largest allowed fraction of events with a timestamp outside the window")
    b.set_defaults(func=cmd_build_matrix)


def cmd_ingest(args: argparse.Namespace) -> int:
    from pipeline.data.ingest import IngestJob

    if args.format == "items":
        return _ingest_items(args)
    if args.date is not None:
        from pipeline.errors import DataError

        raise DataError("--date applies to --format items only", "drop --date (events carry their own dates)")

    r = IngestJob(format=args.format, src=args.src, out=args.out, partition=not args.no_partition).run()
    layout = "dt=YYYY-MM-DD partitions" if r.partitioned else "one folder, no dt= partitions (no timestamps)"
    print(f"ingested {r.rows:,} events into {r.uri} ({layout})")
    return 0


def _ingest_items(args: argparse.Namespace) -> int:
    from pipeline.data.items import ItemsIngestJob
    from pipeline.errors import DataError

    if args.date is None:
        raise DataError("--format items needs --date", "pass --date YYYY-MM-DD, the day this catalogue version is for")
    r = ItemsIngestJob(src=args.src, lake=args.out, date=args.date).run()
    print(f"ingested {r.rows:,} items ({r.items_with_tags:,} with tags) into {r.uri}")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from pipeline.data.synth_events import SynthEventsJob

    r = SynthEventsJob(users=args.users, items=args.items, days=args.days, out=args.out, seed=args.seed,
                          start=args.start, mean_items_per_user=args.mean_items).run()
    print(f"wrote {r.events:,} synthetic events in {r.files} files to {r.uri}")
    return 0


def cmd_build_matrix(args: argparse.Namespace) -> int:
    from pipeline.data.build_matrix import Binarize, BuildMatrixJob
    from pipeline.data.dq import DQConfig

    cfg = BuildMatrixJob(
        events=args.events, as_of=args.as_of, window_days=args.window_days, out=args.out, spark_master=args.spark_master,
        min_user_interactions=args.min_user_interactions, min_item_interactions=args.min_item_interactions,
        binarize=Binarize.parse(args.binarize), n_valid=args.n_valid, n_test=args.n_test, seed=args.seed,
        shuffle_partitions=args.shuffle_partitions,
        dq=DQConfig(max_drop_fraction=args.dq_max_drop, max_duplicate_fraction=args.dq_max_duplicates,
                    max_out_of_window_fraction=args.dq_max_out_of_window))
    r = cfg.run()
    c = r.counts
    print(f"published snapshot {r.snapshot_uri}: {c['users']:,} users ({c['train_users']:,} train, {c['valid_users']:,} valid, "
          f"{c['test_users']:,} test), {c['items']:,} items, {c['train_interactions']:,} training interactions")
    return 0
