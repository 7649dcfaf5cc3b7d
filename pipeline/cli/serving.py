"""`recsys infer` (daily batch inference), `recsys recs` (read one user's published list), and the recommendations
table's operations: `recsys history` (which versions changed a date), `recsys restore` (a date's files as of an
earlier version), `recsys vacuum` (delete what no version within the retention needs)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from pipeline.serving.options import DEFAULT_MODEL


def register(sub: Any) -> None:
    p = sub.add_parser("infer", help="score every active user for a date and publish top-N recommendations")
    p.add_argument("--date", required=True, help="YYYY-MM-DD: histories use events up to and including this date")
    p.add_argument("--events", required=True, help="events Parquet: a dt= partitioned folder or one file (local or s3://)")
    p.add_argument("--out", required=True, help="lake root: writes <out>/recommendations/dt=DATE/")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"models:/NAME@ALIAS, models:/NAME/VERSION or a saved bundle folder (default: {DEFAULT_MODEL})")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow registry that models:/ resolves against "
                        "(default: MLFLOW_TRACKING_URI, else SQLite under RECSYS_HOME)")
    p.add_argument("--top-n", type=int, default=100, help="items per user (fewer only when the catalog is smaller)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when present")
    p.add_argument("--engine", default="local", choices=["local", "spark"],
                   help="spark: the same scoring through mapInArrow, one model copy per executor")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "tf32", "bf16"],
                   help="scoring matmuls (auto: tf32 on CUDA, bf16 on a CPU with native bf16, else fp32)")
    p.add_argument("--memory-budget-mb", type=int, default=1024, help="for one scoring batch's scores + top-k")
    p.add_argument("--history-days", type=int, default=None, help="history window ending at --date (default: all)")
    p.add_argument("--min-weight", type=float, default=None, help="keep events with weight >= this")
    p.add_argument("--shard-events", type=int, default=None, help="events per shard (default: budget / 64 bytes, at most 4M)")
    p.add_argument("--parallel-shards", type=int, default=None,
                   help="shards prepared and published concurrently (default: one per 4 CPU cores, at most 8)")
    p.add_argument("--max-unknown-item-share", type=float, default=0.5,
                   help="refuse to publish when more of the window's events have items the model does not know "
                        "(default 0.5; 1 never refuses)")
    p.add_argument("--max-fallback-share", type=float, default=0.5,
                   help="refuse to publish when more of the active users have no item the model knows "
                        "(default 0.5; 1 never refuses)")
    p.add_argument("--monitor-config", default=None,
                   help="YAML of the daily output monitoring rules (default: configs/monitor.yaml's built-in defaults)")
    p.add_argument("--retention-days", type=int, default=None,
                   help="after publishing, drop dates older than DATE minus this many days and vacuum (default: keep all)")
    p.add_argument("--availability", default=None, metavar="URI",
                   help="Parquet file or folder (local or s3://, e.g. <lake>/availability/dt=DATE/) whose item_id column "
                        "lists the items that may be recommended on --date; short lists are backfilled from popular "
                        "available items (default: every item)")
    p.add_argument("--exclusions", default=None, metavar="URI",
                   help="Parquet file or folder (local or s3://, e.g. <lake>/exclusions/dt=DATE/) with user_id and "
                        "item_id columns: titles each user must not be shown on --date; their lists are refilled "
                        "from the model's next items, then popular ones (default: none)")
    p.add_argument("--items", default=None, metavar="URI",
                   help="the day's items file or folder (the items contract; Parquet or CSV, local or s3://): titles "
                        "the model does not know are scored by its cold head from their metadata (default: "
                        "<out>/items/dt=DATE when present; missing: a warning, warm items only)")
    p.add_argument("--cold-slots", type=int, default=2,
                   help="at most this many new titles per list, each only for a user with a positive cold score (0: off)")
    p.add_argument("--max-model-mb", type=int, default=None,
                   help="refuse a model whose weights exceed this many MiB, before reading them (a dense EASE is "
                        "4 I^2 bytes; default: a quarter of this machine's memory, at most 32 GiB)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs and CI)")
    p.set_defaults(func=cmd_infer)

    r = sub.add_parser("recs", help="print one user's published recommendations")
    r.add_argument("--date", default="latest", help="YYYY-MM-DD or 'latest' (newest committed date)")
    r.add_argument("--user", required=True, help="user_id as in the events (an integer, or 1-256 characters)")
    r.add_argument("--out", required=True, help="lake root given to `recsys infer --out`")
    r.add_argument("--json", action="store_true", help="print JSON instead of a table")
    r.set_defaults(func=cmd_recs)

    h = sub.add_parser("history", help="the recommendations table's versions that changed a date")
    h.add_argument("--out", required=True, help="lake root given to `recsys infer --out`")
    h.add_argument("--date", required=True, help="YYYY-MM-DD")
    h.add_argument("--json", action="store_true", help="print JSON instead of a table")
    h.set_defaults(func=cmd_history)

    rs = sub.add_parser("restore", help="publish a date's recommendations as of an earlier table version again")
    rs.add_argument("--out", required=True, help="lake root given to `recsys infer --out`")
    rs.add_argument("--date", required=True, help="YYYY-MM-DD")
    rs.add_argument("--table-version", dest="version", type=int, default=None,
                    help="table version whose files of the date to restore (default: the version before the date's "
                         "latest change; see `recsys history`)")
    rs.set_defaults(func=cmd_restore)

    v = sub.add_parser("vacuum", help="delete replaced and never-committed recommendation files past a retention")
    v.add_argument("--out", required=True, help="lake root given to `recsys infer --out`")
    v.add_argument("--retain-hours", type=float, default=168.0,
                   help="keep files replaced less than this long ago (restore needs them) and staged files of runs "
                        "younger than this (default 168: a week)")
    v.add_argument("--drop-before", default=None,
                   help="YYYY-MM-DD: first remove the dates before this one from the table (one commit; their files "
                        "go with a later vacuum past the retention): the table's date retention")
    v.add_argument("--dry-run", action="store_true", help="only count what would be deleted")
    v.set_defaults(func=cmd_vacuum)


def cmd_infer(args: argparse.Namespace) -> int:
    from pipeline.io.dates import parse_date
    from pipeline.serving.job import InferJob
    from pipeline.serving.monitoring import load_monitor_config

    job = InferJob(date=parse_date(args.date), events=args.events, out=args.out, model=args.model,
                   tracking_uri=args.tracking_uri, top_n=args.top_n, device=args.device, precision=args.precision,
                   engine=args.engine, memory_budget_mb=args.memory_budget_mb, history_days=args.history_days,
                   min_weight=args.min_weight, shard_events=args.shard_events, parallel_shards=args.parallel_shards,
                   max_unknown_item_share=args.max_unknown_item_share, max_fallback_share=args.max_fallback_share,
                   progress=not args.no_progress, monitor=load_monitor_config(args.monitor_config),
                   retention_days=args.retention_days, availability=args.availability, exclusions=args.exclusions,
                   items=args.items, cold_slots=args.cold_slots, max_model_mb=args.max_model_mb)
    r = job.run()
    print(f"published {r.users} users ({r.fallback_users} fallback) for {r.date.isoformat()} with model version "
          f"{r.model_version}: {r.files} files, {r.unknown_item_events} events with unknown items skipped"
          + (f"; availability: {r.availability_backfilled_users} users backfilled, {r.availability_short_users} with "
             f"fewer than --top-n items" if args.availability else "")
          + (f"; exclusions: {r.exclusions} pairs ({r.exclusions_unknown_items} rows with unknown items ignored), "
             f"{r.exclusions_users} users with one" if args.exclusions else "")
          + (f"; new titles: {r.cold_items_scored} scored, {r.cold_items_shown} shown to {r.cold_users} users"
             if r.cold_items_scored else ""))
    return 0


def cmd_recs(args: argparse.Namespace) -> int:
    from pipeline.serving.recs import user_recommendations

    r = user_recommendations(args.out, args.date, args.user)
    if args.json:
        print(json.dumps(r, default=str))
        return 0
    print(f"user {r['user_id']}  date {r['date']}  model version {r['model_version']}"
          + ("  (popularity fallback)" if r["fallback"] else ""))
    for rank, (item, score) in enumerate(r["items"], 1):
        print(f"{rank:4d}  {item}  {score:.6g}")
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    from pipeline.io.dates import parse_date
    from pipeline.serving.restore import HistoryJob

    r = HistoryJob(out=args.out, date=parse_date(args.date)).run()
    if args.json:
        print(r.model_dump_json())
        return 0
    print(f"{r.table_uri}  date {r.date}  (table version {r.version})")
    if not r.commits:
        print("no commit of this date")
    for c in r.commits:
        what = c.operation + (f" of v{c.restored_version}" if c.restored_version is not None else "")
        print(f"{'*' if c.live else ' '} v{c.version:<5d} {c.timestamp:%Y-%m-%d %H:%M:%S}Z  {what:<16s} model version "
              f"{c.model_version}  rows {c.rows}  {c.run}")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from pipeline.io.dates import parse_date
    from pipeline.serving.restore import RestoreJob

    r = RestoreJob(out=args.out, date=parse_date(args.date), version=args.version).run()
    print(f"restored {r.date} to its files of version {r.restored_version} ({r.rows} rows, model version "
          f"{r.model_version}, {r.run}) as version {r.version} of {r.table_uri}")
    return 0


def cmd_vacuum(args: argparse.Namespace) -> int:
    from pipeline.io.dates import parse_date
    from pipeline.serving.restore import VacuumJob

    drop = None if args.drop_before is None else parse_date(args.drop_before)
    r = VacuumJob(out=args.out, retain_hours=args.retain_hours, dry_run=args.dry_run, drop_before=drop).run()
    verb = "would delete" if r.dry_run else "deleted"
    if r.dropped_dates:
        print(f"{'would drop' if r.dry_run else 'dropped'} {len(r.dropped_dates)} dates: "
              f"{r.dropped_dates[0]} .. {r.dropped_dates[-1]}")
    print(f"{verb} {r.files} files older than {r.retain_hours:g} h from {r.table_uri}"
          + ("" if r.dry_run else f" ({r.run_folders} emptied run folders removed)"))
    return 0
