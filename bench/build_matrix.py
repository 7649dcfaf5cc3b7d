"""bench-build: the weekly matrix build on synthetic ML-20M-shaped events, local[2] (`make bench-build`).

For each size: synthetic events (pipeline/data/synth_events.py, 28 days, ~27k items, users scaled so that 20M
events is ~138k users like ML-20M), then the real job (BuildMatrixJob.run) into a fresh lake. Wall time is
the job alone (the Spark session is started and warmed once before); peak memory is the largest RSS sum over
this process and all its children (the JVM), sampled every 0.1 s. Rows go to docs/benchmarks.md.

`--cluster`: the same sizes on a Spark standalone cluster started here (tests/spark_cluster.py: a master and
`--workers` workers of one core each on 127.0.0.1) against `--master` (local[2]) in the same run. Each build
then runs in its own driver process (one SparkContext per process), warmed before its timer starts; peak RSS
is that driver's process tree (for the cluster: the driver alone, the executors live under the workers). The
two snapshots' content digests are compared and printed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import tempfile
import threading
import time
from pathlib import Path

import psutil

from bench.common import append_row, git_commit, machine, today

HEADER = ["date", "commit", "machine", "events", "users x items", "snapshot (train nnz)", "job wall (s)",
          "events/s", "peak RSS driver+JVM (GiB)", "master"]


class PeakRSS:
    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += p.memory_info().rss
            self.peak = max(self.peak, total)
            time.sleep(0.1)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


CHILD = """
import json, sys, time
from pipeline.data.build_matrix import BuildMatrixJob
from pipeline.io.spark import spark_session
from bench.build_matrix import PeakRSS
job = BuildMatrixJob.model_validate(json.loads(sys.argv[1]))
spark = spark_session(job.spark, "recsys-build-matrix", job.shuffle_partitions, job.driver_memory)
spark.range(100_000).repartition(4).selectExpr("sum(id)").collect()  # JVM and executors up before timing
with PeakRSS() as mem:
    t0 = time.perf_counter()
    r = job.run()
    wall = time.perf_counter() - t0
print("RESULT " + json.dumps({"wall": wall, "peak": mem.peak, "counts": r.counts, "content": r.content_digest}))
"""


def _child_build(fields: dict, env: dict[str, str]) -> dict:
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(fields)], env=env, capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent)
    if done.returncode != 0:
        raise SystemExit(f"build failed ({fields['spark']['master']}):\n{done.stderr[-3000:]}")
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return dict(json.loads(line[len("RESULT "):]))


def cluster_main(args: argparse.Namespace) -> int:
    """local[2] and a standalone cluster, one child driver each, for every size; rows for both."""
    import torch

    from pipeline.data.synth_events import SynthEventsJob
    from tests.spark_cluster import cluster_env, standalone

    with tempfile.TemporaryDirectory(dir=args.work) as tmp, \
            standalone(Path(tmp), workers=args.workers, worker_memory=args.worker_memory) as cluster:
        env = cluster_env()
        for millions in (float(x) for x in args.events.split(",")):
            users = int(138_000 * millions / 20)
            events = Path(tmp) / f"events-{millions:g}M"
            r = SynthEventsJob(users=users, items=args.items, days=28, out=str(events), seed=0,
                               mean_items_per_user=20e6 / 138_000).run()
            base = {"events": str(events), "as_of": "2024-01-28", "window_days": 28, "seed": 0}
            local = {"master": args.master, "driver_memory": "8g"}
            remote = {"master": cluster.master_url, "driver_host": "127.0.0.1", "bind_address": "127.0.0.1",
                      "driver_memory": "4g", "executor_cores": 1, "executor_memory": args.executor_memory}
            results = {}
            for name, spark in (("local", local), ("cluster", remote)):
                results[name] = _child_build({**base, "out": str(Path(tmp) / f"lake-{name}-{millions:g}M"),
                                              "spark": spark}, env)
            same = results["local"]["content"] == results["cluster"]["content"]
            ratio = results["cluster"]["wall"] / results["local"]["wall"]
            print(f"{millions:g}M: cluster/local wall {ratio:.2f}x; content digests "
                  f"{'equal' if same else 'DIFFER'} ({results['local']['content']} / {results['cluster']['content']})",
                  flush=True)
            for name, master in (("local", args.master),
                                 ("cluster", f"standalone, {args.workers} workers x 1 core ({ratio:.2f}x local)")):
                res = results[name]
                c = res["counts"]
                row = [today(), git_commit(), machine(torch.device("cpu")), f"{r.events:,}",
                       f"{c['users']:,} x {c['items']:,}", f"{c['train_interactions']:,}", f"{res['wall']:.1f}",
                       f"{r.events / res['wall']:,.0f}", f"{res['peak'] / 2**30:.2f}", master]
                print(" | ".join(row), flush=True)
                if not args.no_append:
                    append_row("bench-build: weekly matrix build (Spark job, synthetic ML-20M-shaped events, 28 days)",
                               HEADER, row)
            if not same:
                return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    import torch

    from pipeline.data.build_matrix import BuildMatrixJob
    from pipeline.data.synth_events import SynthEventsJob
    from pipeline.io.snapshot import read_manifest
    from pipeline.io.spark import spark_session

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--events", default="10,20", help="millions of events, comma separated (e.g. 10,20,40)")
    p.add_argument("--master", default="local[2]")
    p.add_argument("--items", type=int, default=27_000)
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp folder)")
    p.add_argument("--no-append", action="store_true")
    p.add_argument("--cluster", action="store_true", help="also run on a standalone cluster started here, vs --master")
    p.add_argument("--workers", type=int, default=2, help="--cluster: workers (one core each)")
    p.add_argument("--worker-memory", default="6g", help="--cluster: memory each worker offers")
    p.add_argument("--executor-memory", default="5g", help="--cluster: each executor's heap")
    args = p.parse_args(argv)
    if args.cluster:
        return cluster_main(args)
    spark = spark_session(args.master, "recsys-build-matrix", driver_memory="8g")
    spark.range(1000).selectExpr("sum(id)").collect()  # JVM up before timing
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        for millions in (float(x) for x in args.events.split(",")):
            users = int(138_000 * millions / 20)
            events = Path(tmp) / f"events-{millions:g}M"
            t0 = time.perf_counter()
            r = SynthEventsJob(users=users, items=args.items, days=28, out=str(events), seed=0,
                                  mean_items_per_user=20e6 / 138_000).run()
            gen = time.perf_counter() - t0
            cfg = BuildMatrixJob(events=str(events), as_of=dt.date(2024, 1, 28), window_days=28,
                                    out=str(Path(tmp) / f"lake-{millions:g}M"), spark_master=args.master, seed=0)
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                uri = cfg.run().snapshot_uri
                wall = time.perf_counter() - t0
            c = read_manifest(uri)["counts"]
            row = [today(), git_commit(), machine(torch.device("cpu")), f"{r.events:,}", f"{c['users']:,} x {c['items']:,}",
                   f"{c['train_interactions']:,}", f"{wall:.1f}", f"{r.events / wall:,.0f}", f"{mem.peak / 2**30:.2f}",
                   args.master]
            print(f"{millions:g}M: generated in {gen:.1f}s; " + " | ".join(row), flush=True)
            if not args.no_append:
                append_row("bench-build: weekly matrix build (Spark job, synthetic ML-20M-shaped events, 28 days)",
                           HEADER, row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
