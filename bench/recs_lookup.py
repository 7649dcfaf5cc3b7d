"""make bench-recs: reading one day's published recommendations the way downstream services do.

Untimed set-up: a committed date DAY of the `recommendations` Delta table, --users users (top-100 lists over 20,108
items, Zipf popularity, descending scores), written through pipeline.io.publish exactly as `recsys infer`'s
local engine writes it: users hashed into parts of ~54k users (the default shard size), each part sorted
by user, with the manifest's shard and user-range index. On the local disk and/or a moto S3 server on
127.0.0.1 (never real AWS).

Timed, in the same run:
- one user's list through `read_recommendations(user_ids=[u])` (the index picks one part, Parquet statistics
  one row group), median over random users, against the reference: read every part, then filter (what the
  reader did before the index, and what any Delta reader without one must do: the date's live files);
- 1,000 users at once;
- the whole date streamed with `iter_recommendations` (rows/s, and the RSS it adds) against
  `read_recommendations` of the whole date.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import resource
import shutil
import statistics
import tempfile
import time
from typing import Any

import numpy as np

DAY = "2024-05-03"
EVENTS_PER_USER = 74  # ML-20M's mean history, as in bench-infer: recsys infer's default shards hold ~54k such users
N_ITEMS, TOP_N = 20_108, 100


def build_partition(out_uri: str, n_users: int, seed: int = 0) -> dict[str, Any]:
    import pyarrow as pa

    from pipeline.io.publish import PartitionWriter
    from pipeline.serving.checks import user_range
    from pipeline.serving.layout import partition
    from pipeline.serving.sharding import scheme_for, shard_of
    from pipeline.serving.sizing import SHARD_EVENTS_MAX

    rng = np.random.default_rng(seed)
    users = pa.array(np.unique(rng.integers(0, 50 * n_users, int(n_users * 1.05)))[:n_users], pa.int64())
    n_shards = max(1, -(-n_users * EVENTS_PER_USER // SHARD_EVENTS_MAX))  # as many parts as infer would write
    shard = shard_of(users, n_shards)
    cdf = np.cumsum(1.0 / np.arange(1, N_ITEMS + 1) ** 0.8)
    cdf /= cdf[-1]
    writer = PartitionWriter(partition(out_uri, dt.date.fromisoformat(DAY)))
    for s in range(n_shards):
        mine = users.filter(pa.array(shard == s))  # sorted: `users` is
        m = len(mine)
        items = np.searchsorted(cdf, rng.random(m * TOP_N)).astype(np.int64) + 1
        scores = -np.sort(-rng.random((m, TOP_N), dtype=np.float32) * 10, axis=1).ravel()
        offsets = pa.array(np.arange(0, m * TOP_N + 1, TOP_N, dtype=np.int32))
        table = pa.table({"user_id": mine, "item_ids": pa.ListArray.from_arrays(offsets, pa.array(items)),
                          "scores": pa.ListArray.from_arrays(offsets, pa.array(scores)),
                          "model_version": pa.array(["7"] * m), "fallback": pa.array(np.zeros(m, bool))})
        writer.write_part(table, shard=s, **user_range(mine))
    return writer.commit({"date": DAY, "model_version": "7", "shards": n_shards,
                          "user_sharding": {"scheme": scheme_for(users.type), "n_shards": n_shards}}) | {"users": users}


def full_scan(out_uri: str, wanted: list[int]) -> int:
    """The reference: every part read whole, then filtered (no index)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipeline.io import delta_table
    from pipeline.serving.layout import recommendations_root

    root = recommendations_root(out_uri)
    snapshot = delta_table.open_table(root)  # the date's live files, as any Delta reader finds them
    assert snapshot is not None
    paths = [p for p, _ in delta_table.live_files_of(delta_table.live_files(snapshot), dt.date.fromisoformat(DAY))]
    table = pa.concat_tables(pq.read_table(root.join(p).path, filesystem=root.fs) for p in paths)
    return table.filter(pc.is_in(table["user_id"], value_set=pa.array(wanted, pa.int64()))).num_rows


def timed(fn: Any, *args: Any) -> tuple[float, Any]:
    t = time.perf_counter()
    r = fn(*args)
    return time.perf_counter() - t, r


def measure(store: str, out_uri: str, n_users: int, lookups: int, ref_lookups: int) -> list[str]:
    from bench.common import rss_gib
    from pipeline.serving.recs import iter_recommendations, read_recommendations

    t_build, m = timed(build_partition, out_uri, n_users)
    users = m["users"].to_numpy()
    rng = np.random.default_rng(1)
    size = sum(f["bytes"] for f in m["files"]) / 2**20
    print(f"[{store}] partition: {n_users:,} users, {len(m['files'])} parts, {size:,.0f} MiB (built in {t_build:.1f} s)")

    one = []
    for u in rng.choice(users, lookups, replace=False).tolist():
        dt_, t = timed(read_recommendations, out_uri, DAY, [u])
        assert t.num_rows == 1
        one.append(dt_)
    ref = []
    for u in rng.choice(users, ref_lookups, replace=False).tolist():
        dt_, rows = timed(full_scan, out_uri, [u])
        assert rows == 1
        ref.append(dt_)
    many = rng.choice(users, 1000, replace=False).tolist()
    t_many, t = timed(read_recommendations, out_uri, DAY, many)
    assert t.num_rows == 1000
    del t

    base = rss_gib()
    peak_stream = 0.0
    t0 = time.perf_counter()
    rows = 0
    for b in iter_recommendations(out_uri, DAY):
        rows += b.num_rows
        peak_stream = max(peak_stream, rss_gib() - base)
    t_stream = time.perf_counter() - t0
    assert rows == n_users
    base = rss_gib()
    t_whole, whole = timed(read_recommendations, out_uri, DAY)
    add_whole = rss_gib() - base
    del whole

    med, med_ref = statistics.median(one), statistics.median(ref)
    print(f"[{store}] one user: {med * 1e3:.1f} ms indexed (median of {lookups}) vs {med_ref * 1e3:.0f} ms full scan "
          f"(median of {ref_lookups}): {med_ref / med:.0f}x")
    print(f"[{store}] 1,000 users: {t_many * 1e3:.0f} ms; whole date: streamed {t_stream:.1f} s "
          f"({n_users / t_stream:,.0f} rows/s, +{peak_stream:.2f} GiB RSS) vs read whole {t_whole:.1f} s "
          f"(+{add_whole:.2f} GiB RSS)")
    return [store, f"{n_users:,}", f"{len(m['files'])} ({size:,.0f} MiB)", f"{med * 1e3:.1f}", f"{med_ref * 1e3:.0f}",
            f"{med_ref / med:.0f}x", f"{t_many * 1e3:.0f}", f"{t_stream:.1f} (+{peak_stream:.2f} GiB)",
            f"{t_whole:.1f} (+{add_whole:.2f} GiB)"]


def main(argv: list[str] | None = None) -> None:
    import torch

    from bench.common import append_row, git_commit, machine, today

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--store", choices=["local", "s3", "both"], default="both")
    p.add_argument("--lookups", type=int, default=50, help="random users looked up through the index")
    p.add_argument("--ref-lookups", type=int, default=3, help="users looked up by the full-scan reference")
    p.add_argument("--no-append", action="store_true")
    a = p.parse_args(argv)

    rows = []
    if a.store in ("local", "both"):
        d = tempfile.mkdtemp(prefix="bench-recs-")
        try:
            rows.append(measure("local disk", d, a.users, a.lookups, a.ref_lookups))
        finally:
            shutil.rmtree(d, ignore_errors=True)
    if a.store in ("s3", "both"):
        import boto3
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request log
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
        server.start()
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        # dummy credentials for the local moto server only (never real AWS)
        os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint})
        try:
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench-recs")
            rows.append(measure("S3 (moto, 127.0.0.1)", "s3://bench-recs/lake", a.users, a.lookups, a.ref_lookups))
        finally:
            server.stop()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak RSS of the bench process: {peak:.2f} GiB")
    if not a.no_append:
        header = ["date", "commit", "machine", "store", "users", "parts", "one user, indexed (ms)",
                  "one user, full scan (ms)", "speed-up", "1,000 users (ms)", "whole date streamed (s)",
                  "whole date read (s)"]
        for r in rows:
            append_row("bench-recs: reading published recommendations (lookups and whole dates)", header,
                       [today(), git_commit(), machine(torch.device("cpu")), *r])


if __name__ == "__main__":
    main()
