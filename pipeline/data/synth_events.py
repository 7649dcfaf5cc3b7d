"""Synthetic event streams over days, written as the events contract (dt=YYYY-MM-DD partitions).

Built on pipeline/data/synth.py's generators (Zipf popularity, log-normal activity, taste clusters, distinct
draws per user): this module only adds time and noise.

- Users appear over time: ``initial_user_share`` of them are there on day 0, the others arrive on a
  uniform day; a user's events fall on uniform days from arrival to the last day.
- Items appear over time: ``initial_item_share`` are released on day 0, the others on a uniform day; an
  event drawn before its item's release moves to the release day.
- Noise: ``duplicate_fraction`` of the events are repeated (same user, item, day, a few seconds later);
  ``unseen_fraction`` extra events come from ids outside 0..n-1 (valid ids nobody else uses: one-off users
  and items, which the min-count filters and the split later drop).
- Timestamps are uniform within the day (UTC); ``weight`` is synth.py's play-count-like value (>= 1).

Memory does not grow with the total: users are generated in chunks of about ``CHUNK_EVENTS`` events and
each chunk is written as one file per day (``dt=<day>/part-<chunk>.parquet``); only per-user and per-item
parameter arrays (a few bytes each) live for the whole run. The same seed gives the same files.

``out`` must be new, empty or an earlier synth's output (its ``_RECSYS_EVENTS.json`` marker): the stream is
written beside it and swapped in when complete (pipeline.io.output_guard), so a re-run replaces it and a failure
leaves it as it was.
"""

from __future__ import annotations

import datetime as dt
import itertools

import numpy as np
import pyarrow as pa
from pydantic import Field

from pipeline.data.synth import MIN_ITEMS_PER_USER, _activity, _distinct_items, _Sampler, _zipf_weights
from pipeline.errors import DataError
from pipeline.io.lake import Location, resolve
from pipeline.io.output_guard import replace_output
from pipeline.io.snapshot import table_bytes
from pipeline.job import Job, JobResult

CHUNK_EVENTS = 4_000_000
WRITER = "recsys synth"
SECONDS_PER_DAY = 86_400
SCHEMA = pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()), ("event_ts", pa.timestamp("us", tz="UTC")),
                    ("weight", pa.float32())])


class SynthEventsJob(Job):
    """Realistic synthetic events over days (one dt= partition each), deterministic for a seed."""

    users: int = Field(ge=1)
    items: int = Field(ge=2 * MIN_ITEMS_PER_USER)
    days: int = Field(ge=1)
    out: str
    seed: int = 0
    start: dt.date = dt.date(2024, 1, 1)  # the first day; the last is start + days - 1
    mean_items_per_user: float = Field(30.0, gt=0)
    n_clusters: int = Field(10, ge=1)
    cluster_share: float = Field(0.8, ge=0.0, le=1.0)
    popularity_exponent: float = Field(1.0, ge=0.0)
    initial_user_share: float = Field(0.5, ge=0.0, le=1.0)
    initial_item_share: float = Field(0.7, ge=0.0, le=1.0)
    duplicate_fraction: float = Field(0.01, ge=0.0, le=1.0)
    unseen_fraction: float = Field(0.001, ge=0.0, le=1.0)

    @property
    def last_day(self) -> dt.date:
        """The last day with events (start + days - 1); a DataError when that is past 9999-12-31."""
        room = (dt.date.max - self.start).days  # days after start that the calendar still has
        if self.days - 1 > room:
            raise DataError(f"{self.days} days from {self.start} run past the calendar's last day {dt.date.max}",
                            f"use an earlier --start or at most {room + 1} --days")
        return self.start + dt.timedelta(days=self.days - 1)

    def run(self) -> SynthEventsResult:
        """Write the events, one dt= partition per day."""
        return write_events(self)


class SynthEventsResult(JobResult):
    """Where the events went, how many, in how many files."""
    uri: str
    events: int
    files: int


NEW_TITLE_BASE = 10_000_000  # ids of synth_catalog's new titles: beyond every id the events use


def item_clusters(cfg: SynthEventsJob) -> np.ndarray:
    """Each item's taste cluster, the same draws as write_events (the events' item i is in cluster [i])."""
    rng = np.random.default_rng(cfg.seed)
    _zipf_weights(cfg.items, cfg.popularity_exponent, rng)
    return rng.permutation(np.arange(cfg.items) % min(cfg.n_clusters, cfg.items)).astype(np.int64)


def synth_catalog(cfg: SynthEventsJob, new_titles: int = 0) -> pa.Table:
    """The items contract (pipeline.io.items) for the events' catalogue: a title and a genre tag per item, the genre
    being its taste cluster (so metadata predicts clicks, as real genres do), plus `new_titles` titles without any
    event (ids from NEW_TITLE_BASE), spread over the genres: what a day's catalogue adds."""
    clusters = item_clusters(cfg)
    new = np.arange(new_titles) % min(cfg.n_clusters, cfg.items)
    ids = np.concatenate([np.arange(cfg.items), NEW_TITLE_BASE + np.arange(new_titles)]).astype(np.int64)
    genres = np.concatenate([clusters, new])
    titles = [f"Title {i}" for i in range(cfg.items)] + [f"New title {j}" for j in range(new_titles)]
    return pa.table({"item_id": pa.array(ids), "title": pa.array(titles),
                     "tags": pa.array([[f"genre-{g}"] for g in genres.tolist()], pa.list_(pa.string()))})


def _arrival(n: int, share: float, days: int, rng: np.random.Generator) -> np.ndarray:
    late = rng.random(n) >= share
    return np.where(late, rng.integers(0, days, size=n), 0).astype(np.int64)


def _chunks(want: np.ndarray) -> list[tuple[int, int]]:
    starts = np.cumsum(want) - want
    chunk_of_user = starts // CHUNK_EVENTS
    edges = np.concatenate(([0], np.flatnonzero(np.diff(chunk_of_user)) + 1, [len(want)]))
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges)]


def write_events(cfg: SynthEventsJob) -> SynthEventsResult:
    """The job's work (SynthEventsJob.run): draw users, items and days, write day by day."""
    cfg.last_day  # noqa: B018 - refuses a stream that would run past the calendar, before anything is written
    rng = np.random.default_rng(cfg.seed)
    n_users, n_items, days = cfg.users, cfg.items, cfg.days
    # the same draws, in the same order, as synth.synth_interactions_with_clusters
    popularity = _zipf_weights(n_items, cfg.popularity_exponent, rng)
    item_cluster = rng.permutation(np.arange(n_items) % min(cfg.n_clusters, n_items)).astype(np.int64)
    user_cluster = rng.integers(0, min(cfg.n_clusters, n_items), size=n_users, dtype=np.int64)
    want = _activity(n_users, cfg.mean_items_per_user, n_items // 2, rng)
    sampler = _Sampler(popularity, item_cluster, min(cfg.n_clusters, n_items), cfg.cluster_share)
    user_arrival = _arrival(n_users, cfg.initial_user_share, days, rng)
    item_release = _arrival(n_items, cfg.initial_item_share, days, rng)
    day0 = int(np.datetime64(cfg.start.isoformat(), "s").astype(np.int64))

    n_events = n_files = 0
    with replace_output(cfg.out, WRITER) as staged:  # a foreign --out is refused here, before anything is written
        n_events, n_files = _write_chunks(cfg, staged.location, want, user_cluster, sampler, user_arrival,
                                          item_release, day0)
        staged.details.update(config=cfg.model_dump(mode="json"), events=n_events, files=n_files)
    return SynthEventsResult(uri=resolve(cfg.out).uri, events=n_events, files=n_files)


def _write_chunks(cfg: SynthEventsJob, root: Location, want: np.ndarray, user_cluster: np.ndarray,
                  sampler: _Sampler, user_arrival: np.ndarray, item_release: np.ndarray,
                  day0: int) -> tuple[int, int]:
    """Draw each chunk of users' events and write them under `root`, one file per (chunk, day)."""
    n_users, n_items, days = cfg.users, cfg.items, cfg.days
    n_events = n_files = 0
    for chunk, (lo, hi) in enumerate(_chunks(want)):
        crng = np.random.default_rng([cfg.seed, chunk + 1])  # per chunk: independent of the other chunks
        items = _distinct_items(want[lo:hi], user_cluster[lo:hi], sampler, n_items, crng)
        users = np.repeat(np.arange(lo, hi, dtype=np.int64), want[lo:hi])
        arrive = user_arrival[users]
        day = arrive + np.floor(crng.random(len(users)) * (days - arrive)).astype(np.int64)
        day = np.maximum(day, item_release[items])
        sec = crng.integers(0, SECONDS_PER_DAY - 60, size=len(users))
        weight = (np.floor(crng.lognormal(0.0, 1.0, size=len(users))) + 1.0).astype(np.float32)
        dup = np.flatnonzero(crng.random(len(users)) < cfg.duplicate_fraction)
        n_unseen = int(crng.binomial(len(users), cfg.unseen_fraction)) if cfg.unseen_fraction else 0
        base = n_users + n_items + lo  # unseen ids: beyond every real id, distinct across chunks
        users = np.concatenate([users, users[dup], base + np.arange(n_unseen)])
        items = np.concatenate([items, items[dup], n_items + lo + crng.integers(0, max(1, hi - lo), size=n_unseen)])
        day = np.concatenate([day, day[dup], crng.integers(0, days, size=n_unseen)])
        sec = np.concatenate([sec, sec[dup] + crng.integers(1, 60, size=len(dup)),
                              crng.integers(0, SECONDS_PER_DAY, size=n_unseen)])
        weight = np.concatenate([weight, weight[dup], np.ones(n_unseen, np.float32)])
        order = np.argsort(day, kind="stable")
        bounds = np.searchsorted(day[order], np.arange(days + 1))
        for d in range(days):
            sel = order[bounds[d]:bounds[d + 1]]
            if len(sel) == 0:
                continue
            ts = ((day0 + d * SECONDS_PER_DAY + sec[sel]) * 1_000_000).astype("datetime64[us]")
            table = pa.table([users[sel], items[sel], pa.array(ts, pa.timestamp("us", tz="UTC")), weight[sel]], schema=SCHEMA)
            name = f"dt={(cfg.start + dt.timedelta(days=d)).isoformat()}"
            root.join(name, f"part-{chunk:05d}.parquet").write_bytes(table_bytes(table))
            n_events += len(sel)
            n_files += 1
    return n_events, n_files
