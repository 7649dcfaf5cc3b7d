"""Shared helpers of the inference tests: a tiny fitted bundle, synthetic events in the lake, and `run_infer`
(publish with an in-memory bundle, returning the run's manifest)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp

from model.recommenders import make_recommender
from model.train import TrainConfig
from model.vae import VAEConfig
from pipeline.io import lake
from pipeline.io.bundle import ModelBundle
from pipeline.serving.job import InferJob, publish_recommendations

N_ITEMS = 40
DATES = ("2024-05-01", "2024-05-02", "2024-05-03")


def item_ids(string: bool = False) -> np.ndarray:
    return np.array([f"i{c}" for c in range(N_ITEMS)]) if string else np.arange(1000, 1000 + N_ITEMS, dtype=np.int64)


def tiny_bundle(string_items: bool = False, n_items: int = N_ITEMS, seed: int = 0) -> ModelBundle:
    rng = np.random.default_rng(seed)
    x = sp.csr_matrix((rng.random((150, n_items)) < 0.2).astype(np.float32))
    rec = make_recommender("multivae", train=TrainConfig(epochs=1, batch_size=50, device="cpu", progress=False, seed=seed),
                           model_config=VAEConfig(hidden_dims=(16,), latent_dim=4)).fit(x)
    pop = np.asarray(x.sum(0)).ravel().astype(np.float32)
    ids = item_ids(string_items)[:n_items] if n_items <= N_ITEMS else np.arange(1000, 1000 + n_items, dtype=np.int64)
    return ModelBundle(rec, ids, pop, "multivae", {}, "snap-test")


def events_table(n_users: int = 60, seed: int = 1, string_users: bool = False, string_items: bool = False,
                 unknown_every: int = 0) -> pa.Table:
    """Events over DATES: each user a few items; every `unknown_every`-th event an item the model lacks."""
    rng = np.random.default_rng(seed)
    users, items, days = [], [], []
    for u in range(n_users):
        n = int(rng.integers(1, 8))
        for c in rng.choice(N_ITEMS, size=n, replace=False):
            users.append(u)
            items.append(int(c))
            days.append(DATES[int(rng.integers(0, len(DATES)))])
    item_col: list = [(f"i{c}" if string_items else 1000 + c) for c in items]
    if unknown_every:
        for j in range(0, len(item_col), unknown_every):
            item_col[j] = "zz-unknown" if string_items else 999_999
    ts = [dt.datetime.fromisoformat(d) + dt.timedelta(hours=3) for d in days]
    user_col: list = [f"u{u}" for u in users] if string_users else users
    return pa.table({"user_id": pa.array(user_col, pa.string() if string_users else pa.int64()),
                     "item_id": pa.array(item_col, pa.string() if string_items else pa.int64()),
                     "event_ts": pa.array(ts, pa.timestamp("us")),
                     "weight": pa.array(rng.random(len(users)) * 5, pa.float64()),
                     "dt": pa.array(days)})


def write_events(table: pa.Table, uri: str) -> str:
    """Hive dt= partitions under `uri` (local or s3://) through the lake layer."""
    root = lake.resolve(uri)
    for day in sorted(set(table.column("dt").to_pylist())):
        part = table.filter(pa.compute.equal(table.column("dt"), day)).drop_columns(["dt"])
        loc = root.join(f"dt={day}", "part-0.parquet")
        loc.mkdir_parent()
        pq.write_table(part, loc.path, filesystem=loc.fs)
    return uri


FALLBACK_USER = 10_000  # events_with_a_fallback_user's extra user: only an item no model knows


def events_with_a_fallback_user(directory: Path) -> tuple[pa.Table, str]:
    """events_table(60 users, an unknown item every 11th event) plus FALLBACK_USER, whose one event is an item the
    model lacks (the popularity fallback), written under `directory`."""
    table = events_table(n_users=60, unknown_every=11)
    extra = pa.table({"user_id": pa.array([FALLBACK_USER], pa.int64()), "item_id": pa.array([999_999], pa.int64()),
                      "event_ts": pa.array([dt.datetime(2024, 5, 3, 3)], pa.timestamp("us")),
                      "weight": pa.array([1.0]), "dt": pa.array(["2024-05-03"])})
    table = pa.concat_tables([table, extra])
    return table, write_events(table, str(directory))


def put_back_list(monkeypatch: Any, user: Any, before: dict[Any, dict[str, Any]]) -> None:
    """Make the output check see `user`'s list as published in `before` (a planted regression: the check must
    refuse it); every other row as scored."""
    from pipeline.serving import checks

    real = checks.finalize_part

    def put_back(t: pa.Table) -> pa.Table:
        rows = t.to_pylist()
        for row in rows:
            if row["user_id"] == user:
                row["item_ids"], row["scores"] = before[user]["item_ids"], before[user]["scores"]
        return real(pa.Table.from_pylist(rows, schema=t.schema))

    monkeypatch.setattr(checks, "finalize_part", put_back)


def write_events_local(table: pa.Table, directory: Path) -> str:
    return write_events(table, str(directory))


def run_infer(job: InferJob, bundle: ModelBundle, version: str) -> dict[str, Any]:
    """Publish with `bundle` named `version`; returns the run's manifest, after checking that the typed result
    says the same (where, which run, how many users and files)."""
    r = publish_recommendations(job, bundle, version)
    m = r.manifest()
    assert r.partition_uri == job.partition_uri and r.run == m["run"] and r.date.isoformat() == m["date"]
    assert (r.users, r.files, r.fallback_users, r.unknown_item_events, r.events, r.precision, r.seconds) == (
        m["rows"], len(m["files"]), m["fallback_users"], m["unknown_item_events"], m["events"], m["precision"], m["seconds"])
    assert r.model_version == m["model_version"] == version
    return m
