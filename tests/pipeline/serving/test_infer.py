"""pipeline.serving (InferJob and its pieces): end to end (local lake and S3 on moto), re-runs, history windows,
unknown items, fallback users, batch sizing from the memory budget, and every pre-publish output check."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import scipy.sparse as sp
from deltalake import DeltaTable
from infer_support import DATES, events_table, run_infer, tiny_bundle, write_events

from pipeline.errors import DataError
from pipeline.io import delta_table, lake
from pipeline.io.bundle import ModelBundle
from pipeline.serving import checks, scoring, sizing, spill
from pipeline.serving.checks import OutputCheckError
from pipeline.serving.events import open_events
from pipeline.serving.job import InferJob
from pipeline.serving.model_loading import load_model
from pipeline.serving.recs import iter_recommendations, read_recommendations
from pipeline.serving.sizing import batch_size_for
from pipeline.serving.vocab import dense_lookup, map_items, vocabulary

DAY = dt.date(2024, 5, 3)


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    return tiny_bundle()


@pytest.fixture(scope="module")
def events(tmp_path_factory: pytest.TempPathFactory) -> tuple[pa.Table, str]:
    table = events_table(unknown_every=7)
    return table, write_events(table, str(tmp_path_factory.mktemp("events")))


def cfg(events_uri: str, out: str | Path, **kw: object) -> InferJob:
    base: dict[str, object] = {"date": DAY, "events": events_uri, "out": str(out), "device": "cpu", "progress": False,
                               "shard_events": 100, "top_n": 10}
    return InferJob(**(base | kw))  # type: ignore[arg-type]


def expected(bundle: ModelBundle, table: pa.Table, top_n: int, last: str = DATES[-1], first: str = DATES[0]):
    """Recommendations computed the plain way: one CSR of all users, bundle.recommend, fallback by hand."""
    t = table.filter(pc.and_(pc.less_equal(table["dt"], last), pc.greater_equal(table["dt"], first)))
    index = bundle.item_index()
    users = sorted(set(t["user_id"].to_pylist()))
    row = {u: i for i, u in enumerate(users)}
    x = sp.lil_matrix((len(users), bundle.n_items), dtype=np.float32)
    for u, it in zip(t["user_id"].to_pylist(), t["item_id"].to_pylist(), strict=True):
        if it in index:
            x[row[u], index[it]] = 1.0
    top, scores = bundle.recommend(x.tocsr(), top_n)
    fb, _ = bundle.fallback(top_n)
    out = {}
    for u in users:
        r = row[u]
        if x[r].nnz == 0:
            out[u] = ([bundle.item_ids[c] for c in fb], True)
        else:
            keep = scores[r] > -np.inf
            out[u] = ([bundle.item_ids[c] for c in top[r][keep]], False)
    return out


def as_dict(table: pa.Table) -> dict:
    return {r["user_id"]: (r["item_ids"], r["fallback"]) for r in table.to_pylist()}


def test_end_to_end_local(tmp_path: Path, bundle: ModelBundle, events: tuple[pa.Table, str]) -> None:
    table, uri = events
    m = run_infer(cfg(uri, tmp_path), bundle, "7")
    got = read_recommendations(str(tmp_path), DAY.isoformat())
    assert as_dict(got) == expected(bundle, table, 10)
    assert m["rows"] == got.num_rows == len(set(table["user_id"].to_pylist())) and m["shards"] > 1
    assert set(got["model_version"].to_pylist()) == {"7"} and m["model_version"] == "7"
    assert got.schema.field("scores").type == pa.list_(pa.float32())
    # unknown items are skipped and counted; users left with no known item get the flagged fallback
    assert m["unknown_item_events"] == sum(1 for i in table["item_id"].to_pylist() if i == 999_999) > 0
    assert m["unknown_items"] == 1
    assert m["fallback_users"] == sum(got["fallback"].to_pylist()) >= 1
    files = [f["path"] for f in m["files"]]
    run_dir = tmp_path / "recommendations" / f"dt={DAY}" / m["run"]
    names = sorted(p.name for p in run_dir.iterdir())  # besides the parts, only files Delta readers skip ("_...")
    assert [n for n in names if not n.startswith("_")] == sorted(files) and "_manifest.json" in names


@pytest.mark.parametrize("vocab_ids", [np.array([5, 0, 9, 3]), np.array([7, 10**15, 2, 40]), np.array(["b", "a", "c"])],
                         ids=["dense-table", "sparse-ids-hash", "strings"])
def test_map_items_table_and_hash_agree(vocab_ids: np.ndarray) -> None:
    vocab = pa.array(vocab_ids)
    lut = dense_lookup(vocab)
    assert (lut is not None) == (vocab_ids[0] == 5)
    pool = list(vocab_ids) + ([-1, 4, 10, 2**40, 6] if vocab_ids.dtype != object and vocab_ids.dtype.kind == "i"
                              else ["zz", ""])
    items = pa.array([pool[i] for i in np.random.default_rng(0).integers(0, len(pool), 500)])
    want = np.array([list(vocab_ids).index(x) if x in list(vocab_ids) else -1 for x in items.to_pylist()], np.int32)
    assert np.array_equal(map_items(items, vocab, lut), want)
    assert np.array_equal(map_items(items, vocab), want)  # the hash path
    if lut is not None:  # other integer widths are cast first; nulls go through the hash path
        assert map_items(pa.array([9, -1, 3, 4], pa.int32()), vocab, lut).tolist() == [2, -1, 3, -1]
        assert map_items(pa.array([5, None, 9], pa.int64()), vocab, lut).tolist() == [0, -1, 2]


@pytest.mark.parametrize("shard_events", [1, 10**9], ids=["many-shards", "one-shard"])
def test_shard_count_does_not_change_the_output(tmp_path: Path, bundle: ModelBundle, events: tuple[pa.Table, str],
                                                shard_events: int) -> None:
    table, uri = events
    m = run_infer(cfg(uri, tmp_path, shard_events=shard_events), bundle, "7")
    assert (m["shards"] == 1) == (shard_events == 10**9)
    assert as_dict(read_recommendations(str(tmp_path), DAY)) == expected(bundle, table, 10)
    ph = m["phase_seconds"]
    assert set(ph) >= {"spill", "histories", "score", "table", "check", "write", "wait_histories", "wait_publish"}
    # spill, waits and scoring run one after another in the main thread: together at most the run's wall time
    assert ph["spill"] + ph["wait_histories"] + ph["score"] + ph["wait_publish"] <= m["seconds"]


def test_spill_in_worker_threads_writes_the_serial_bytes(tmp_path: Path, bundle: ModelBundle, events: tuple[pa.Table, str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches are mapped and split in threads but written in scan order: the shard files, event and unknown-item
    counts are the same for any thread count (small batches, so many are in flight)."""
    table, uri = events
    monkeypatch.setattr(spill, "SPILL_BATCH_ROWS", 7)
    dataset, items = open_events(uri), vocabulary(bundle)
    got = []
    for threads in (1, 3):
        monkeypatch.setattr(spill.os, "cpu_count", lambda threads=threads: threads)
        d = tmp_path / f"t{threads}"
        d.mkdir()
        spilled, counts = spill.spill_events(dataset, cfg(uri, tmp_path, shard_events=30), items, d)
        got.append((counts, [spilled.path(s).read_bytes() for s in range(spilled.n)]))
    assert got[0] == got[1] and len(got[0][1]) > 2
    assert got[0][0] == {"events": table.num_rows, "unknown_item_events": sum(i == 999_999 for i in table["item_id"].to_pylist()),
                         "unknown_items": 1}


def test_parallel_shards_give_identical_parts(tmp_path: Path, bundle: ModelBundle, events: tuple[pa.Table, str]) -> None:
    """Parts finish in any order when several shards are in flight; their names, bytes and manifest order do not
    depend on it."""
    _, uri = events
    runs = [run_infer(cfg(uri, tmp_path / f"p{p}", shard_events=20, parallel_shards=p), bundle, "7") for p in (1, 4, 64)]
    assert runs[0]["shards"] > 8 and [r["parallel_shards"] for r in runs] == [1, 4, 64]
    files = [[{k: f[k] for k in ("path", "sha256", "rows", "shard", "user_min", "user_max")} for f in r["files"]]
             for r in runs]
    assert files[0] == files[1] == files[2]
    assert [f["path"] for f in files[0]] == sorted(f["path"] for f in files[0])
    assert all(f["path"] == f"part-{f['shard']:05d}.parquet" for f in files[0])


def test_a_failed_check_in_a_later_shard_publishes_nothing_when_parallel(
        tmp_path: Path, bundle: ModelBundle, events: tuple[pa.Table, str], monkeypatch: pytest.MonkeyPatch) -> None:
    _, uri = events
    first = run_infer(cfg(uri, tmp_path, shard_events=20), bundle, "7")
    calls = {"n": 0}
    lock = threading.Lock()

    def corrupt_fifth(t: pa.Table) -> pa.Table:
        with lock:
            calls["n"] += 1
            n = calls["n"]
        return _dup_row(t) if n == 5 else t

    monkeypatch.setattr(checks, "finalize_part", corrupt_fifth)
    with pytest.raises(OutputCheckError, match="duplicate users"):
        run_infer(cfg(uri, tmp_path, shard_events=20, parallel_shards=4), bundle, "7")
    part = tmp_path / "recommendations" / f"dt={DAY}"
    assert sorted(p.name for p in part.iterdir()) == [first["run"]]
    assert read_recommendations(str(tmp_path), DAY).num_rows == first["rows"]


def test_precision_auto_is_fp32_on_cpu_and_tf32_falls_back() -> None:
    with scoring.scoring_precision("auto", "cpu") as a, scoring.scoring_precision("tf32", "cpu") as b:
        assert a == b == "fp32"
    torch = pytest.importorskip("torch")
    with scoring.scoring_precision("bf16", "cpu") as c:
        assert c == "bf16" and torch.is_autocast_enabled("cpu")
    assert not torch.is_autocast_enabled("cpu")


def test_bf16_scoring_passes_the_checks_and_mostly_agrees(tmp_path: Path, bundle: ModelBundle,
                                                          events: tuple[pa.Table, str]) -> None:
    table, uri = events
    m = run_infer(cfg(uri, tmp_path, precision="bf16"), bundle, "7")  # the output checks ran on bf16 scores
    assert m["precision"] == "bf16"
    got, want = as_dict(read_recommendations(str(tmp_path), DAY)), expected(bundle, table, 10)
    assert got.keys() == want.keys()
    overlap = np.mean([len(set(got[u][0]) & set(want[u][0])) / max(1, len(want[u][0])) for u in want])
    assert overlap > 0.8  # rounding may swap near-ties at the cut, not the whole list


def test_catalog_smaller_than_n_gives_every_unseen_item(tmp_path: Path, bundle: ModelBundle,
                                                       events: tuple[pa.Table, str]) -> None:
    table, uri = events
    run_infer(cfg(uri, tmp_path, top_n=100), bundle, "7")
    got = read_recommendations(str(tmp_path), DAY)
    assert as_dict(got) == expected(bundle, table, 100)
    lengths = {len(v[0]) for v in as_dict(got).values()}
    assert max(lengths) == bundle.n_items and min(lengths) < bundle.n_items  # fallback users: all; others: unseen


def test_history_window_and_date_cut(tmp_path: Path, bundle: ModelBundle, events: tuple[pa.Table, str]) -> None:
    table, uri = events
    run_infer(cfg(uri, tmp_path / "a", date=dt.date(2024, 5, 2)), bundle, "7")
    assert as_dict(read_recommendations(str(tmp_path / "a"), "2024-05-02")) == expected(bundle, table, 10, last=DATES[1])
    run_infer(cfg(uri, tmp_path / "b", history_days=1), bundle, "7")  # only the date itself: fewer active users
    got = as_dict(read_recommendations(str(tmp_path / "b"), DAY))
    assert got == expected(bundle, table, 10, first=DATES[2])
    assert len(got) < len(set(table["user_id"].to_pylist()))


def test_single_file_with_event_ts_string_ids(tmp_path: Path) -> None:
    b = tiny_bundle(string_items=True)
    table = events_table(string_users=True, string_items=True, unknown_every=5)
    path = tmp_path / "events.parquet"
    import pyarrow.parquet as pq

    pq.write_table(table.drop_columns(["dt"]), path)  # no partitions: event_ts cuts the history at the date
    m = run_infer(cfg(str(path), tmp_path / "out", date=dt.date(2024, 5, 2)), b, "v")
    got = read_recommendations(str(tmp_path / "out"), "latest", user_ids=["u1", "u2", "u3"])
    want = expected(b, table, 10, last=DATES[1])
    assert as_dict(got) == {u: want[u] for u in ("u1", "u2", "u3") if u in want}
    assert m["rows"] == len(want) and m["unknown_items"] == 1


def test_rerun_replaces_the_partition_with_identical_content(tmp_path: Path, bundle: ModelBundle,
                                                            events: tuple[pa.Table, str]) -> None:
    _, uri = events
    a = run_infer(cfg(uri, tmp_path), bundle, "7")
    b = run_infer(cfg(uri, tmp_path), bundle, "7")
    part = tmp_path / "recommendations" / f"dt={DAY}"
    assert a["run"] != b["run"]
    assert sorted(p.name for p in part.iterdir()) == sorted([a["run"], b["run"]])  # the old run stays (restore)
    live = DeltaTable(str(tmp_path / "recommendations")).file_uris()
    assert len(live) == len(b["files"]) and all(f"/{b['run']}/" in f for f in live)  # but only b's files are live
    assert [(f["sha256"], f["rows"]) for f in a["files"]] == [(f["sha256"], f["rows"]) for f in b["files"]]
    assert read_recommendations(str(tmp_path), DAY).num_rows == a["rows"]


def test_default_shard_size_follows_the_budget_up_to_a_cap() -> None:
    assert sizing.shard_events_for(1) == 200_000  # the floor
    assert sizing.shard_events_for(128) == 128 * 2**20 // 64 < sizing.SHARD_EVENTS_MAX
    # a large budget (a GPU's batch) does not make shards large: the first and last shards are not overlapped
    assert sizing.shard_events_for(1024) == sizing.shard_events_for(8192) == sizing.SHARD_EVENTS_MAX


def test_memory_budget_sets_the_batch_size(tmp_path: Path, bundle: ModelBundle, events: tuple[pa.Table, str]) -> None:
    # per user: 4·I scores + 4·I top-k tie workspace + 12·(k+1) + 8·600
    assert batch_size_for(20_108, 100, 1024) == min(4096, 2**30 // (8 * 20_108 + 12 * 101 + 4800))
    assert batch_size_for(20_108, 100, 100, max_batch=10**9) == 100 * 2**20 // (8 * 20_108 + 12 * 101 + 4800)
    with pytest.raises(DataError, match="memory-budget-mb"):
        batch_size_for(10_000_000, 100, 16)
    table, uri = events
    # a budget for 3 users per batch still gives the same recommendations
    per_user = 8 * bundle.n_items + 12 * 11 + 8 * 600
    small = run_infer(cfg(uri, tmp_path / "small", max_batch=3), bundle, "7")
    assert small["batch_size"] == 3 and batch_size_for(bundle.n_items, 10, 16) == min(4096, 16 * 2**20 // per_user)
    assert as_dict(read_recommendations(str(tmp_path / "small"), DAY)) == expected(bundle, table, 10)


def _drop_row(t: pa.Table) -> pa.Table:
    return t.slice(1)


def _dup_row(t: pa.Table) -> pa.Table:
    return pa.concat_tables([t.slice(0, t.num_rows - 1), t.slice(0, 1)])


def _map_lists(t: pa.Table, fn: Callable[[dict], None]) -> pa.Table:
    rows = t.to_pylist()
    for r in rows:
        if not r["fallback"]:
            fn(r)
            break
    return pa.Table.from_pylist(rows, schema=t.schema)


SEEN: dict[int, list[int]] = {}


def _seen_item(t: pa.Table) -> pa.Table:
    def f(r: dict) -> None:
        r["item_ids"][-1] = SEEN[r["user_id"]][0]

    return _map_lists(t, f)


CORRUPTIONS: dict[str, tuple[Callable[[pa.Table], pa.Table], str]] = {
    "missing user": (_drop_row, "rows for .* active users"),
    "duplicate user": (_dup_row, "duplicate users"),
    "seen item": (_seen_item, "already seen"),
    "short list": (lambda t: _map_lists(t, lambda r: (r["item_ids"].pop(), r["scores"].pop())), "items, expected"),
    "repeated item": (lambda t: _map_lists(t, lambda r: r["item_ids"].__setitem__(1, r["item_ids"][0])), "repeats an item"),
    "ascending scores": (lambda t: _map_lists(t, lambda r: r["scores"].reverse()), "descending"),
    "wrong version": (lambda t: t.set_column(3, "model_version", pa.array(["x"] * t.num_rows)), "model_version"),
    "fallback flag": (lambda t: t.set_column(4, "fallback", pc.invert(t["fallback"])), "fallback flag"),
    "nan score": (lambda t: _map_lists(t, lambda r: r["scores"].__setitem__(0, float("nan"))), "non-finite|descending"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_every_output_check_blocks_publishing(name: str, tmp_path: Path, bundle: ModelBundle,
                                             events: tuple[pa.Table, str], monkeypatch: pytest.MonkeyPatch) -> None:
    table, uri = events
    index = bundle.item_index()
    SEEN.clear()
    for u, it in zip(table["user_id"].to_pylist(), table["item_id"].to_pylist(), strict=True):
        if it in index:
            SEEN.setdefault(u, []).append(it)
    first = run_infer(cfg(uri, tmp_path), bundle, "7")  # a previous good partition
    corrupt, message = CORRUPTIONS[name]
    monkeypatch.setattr(checks, "finalize_part", corrupt)
    with pytest.raises(OutputCheckError, match=message):
        run_infer(cfg(uri, tmp_path), bundle, "7")
    part = tmp_path / "recommendations" / f"dt={DAY}"
    assert sorted(p.name for p in part.iterdir()) == [first["run"]]  # nothing new, nothing left
    assert read_recommendations(str(tmp_path), DAY).num_rows == first["rows"]


def test_bad_inputs_are_clear_errors(tmp_path: Path, bundle: ModelBundle, events: tuple[pa.Table, str]) -> None:
    _, uri = events
    with pytest.raises(DataError, match="no events up to"):
        run_infer(cfg(uri, tmp_path, date=dt.date(2020, 1, 1)), bundle, "7")
    with pytest.raises(DataError, match="no events at"):
        run_infer(cfg(str(tmp_path / "nope"), tmp_path), bundle, "7")
    bad = tmp_path / "bad.parquet"
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"user": [1], "item_id": [1]}), bad)
    with pytest.raises(DataError, match="lack column"):
        run_infer(cfg(str(bad), tmp_path), bundle, "7")
    with pytest.raises(DataError, match="neither models"):
        load_model(str(tmp_path), "cpu")
    assert not (tmp_path / "recommendations").exists()


def test_end_to_end_s3(s3_bucket: str, bundle: ModelBundle, events: tuple[pa.Table, str]) -> None:
    table, _ = events
    ev = write_events(table, f"{s3_bucket}/lake/events")
    out = f"{s3_bucket}/lake"
    m = run_infer(cfg(ev, out), bundle, "7")
    again = run_infer(cfg(ev, out), bundle, "7")  # re-run on S3: replaces, never duplicates
    part = lake.resolve(out).join("recommendations", f"dt={DAY}")
    assert sorted(n for n in part.list() if n.startswith("run-")) == sorted([m["run"], again["run"]])
    live = delta_table.live_files(delta_table.open_table(lake.resolve(out).join("recommendations")))  # type: ignore[arg-type]
    assert live.num_rows == len(again["files"]) and all(f"/{again['run']}/" in p for p in live["path"].to_pylist())
    got = read_recommendations(out, "latest")
    assert as_dict(got) == expected(bundle, table, 10) and got.num_rows == m["rows"]
    # lookups and streaming through the S3 filesystem (the index picks parts; row groups read by range)
    users = got["user_id"].to_pylist()[::5]
    few = read_recommendations(out, DAY, user_ids=users)
    assert sorted(few["user_id"].to_pylist()) == sorted(users) and len(m["files"]) > 1
    assert as_dict(few) == {u: v for u, v in as_dict(got).items() if u in set(users)}
    assert sum(b.num_rows for b in iter_recommendations(out, "latest", batch_size=7)) == m["rows"]


def test_cli_infer_and_recs(tmp_path: Path, bundle: ModelBundle, events: tuple[pa.Table, str],
                            capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.cli.main import build_parser, main

    _, uri = events
    defaults = build_parser().parse_args(["infer", "--date", "2024-05-03", "--events", uri, "--out", str(tmp_path)])
    # the name training registers under, at alias champion; the job's registry only when asked
    assert defaults.model == InferJob.model_fields["model"].default == "models:/recsys-multivae-pia@champion"
    assert defaults.tracking_uri is None
    model_dir = bundle.save(tmp_path / "bundle")
    out = tmp_path / "lake"
    assert main(["infer", "--date", "2024-05-03", "--events", uri, "--out", str(out), "--model", str(model_dir),
                 "--device", "cpu", "--top-n", "5", "--no-progress", "--shard-events", "100"]) == 0
    assert "published" in capsys.readouterr().out
    assert main(["recs", "--date", "latest", "--user", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("user 3") and "local-" in printed and len(printed.strip().splitlines()) == 6
    assert main(["infer", "--date", "2024-02-30", "--events", uri, "--out", str(out), "--model", str(model_dir)]) == 2
    assert "not a calendar date" in capsys.readouterr().err
    assert main(["recs", "--date", "latest", "--user", "3; rm -rf /", "--out", str(out)]) == 2  # integer partition
    assert "is not an integer, but this partition has integer user ids" in capsys.readouterr().err
    assert main(["recs", "--date", "latest", "--user", "3\x00", "--out", str(out)]) == 2
    assert "invalid user id" in capsys.readouterr().err


def _published(out: Path) -> list[str]:
    part = out / "recommendations" / f"dt={DAY}"
    return sorted(p.name for p in part.iterdir()) if part.exists() else []


def test_min_weight_filters_and_needs_a_numeric_weight_column(tmp_path: Path, bundle: ModelBundle,
                                                             events: tuple[pa.Table, str]) -> None:
    import pyarrow.parquet as pq

    table, uri = events
    run_infer(cfg(uri, tmp_path, min_weight=2.5), bundle, "7")
    heavy = table.filter(pc.greater_equal(table["weight"], 2.5))
    assert as_dict(read_recommendations(str(tmp_path), DAY)) == expected(bundle, heavy, 10)
    before = _published(tmp_path)
    for name, weight in (("none", None), ("text", pa.array(["3"] * table.num_rows))):
        path = tmp_path / f"events-{name}.parquet"
        t = table.drop_columns(["weight"])
        pq.write_table(t if weight is None else t.append_column("weight", weight), path)
        with pytest.raises(DataError, match=r"--min-weight needs a numeric weight column; the events have "
                                            rf"{'none' if weight is None else 'one of type string'}\. Fix: drop --min-weight"):
            run_infer(cfg(str(path), tmp_path, min_weight=2.5), bundle, "8")
        assert _published(tmp_path) == before  # the earlier partition is untouched
    assert set(read_recommendations(str(tmp_path), DAY)["model_version"].to_pylist()) == {"7"}


def test_single_file_with_date_typed_dt(tmp_path: Path, bundle: ModelBundle, events: tuple[pa.Table, str]) -> None:
    import pyarrow.parquet as pq

    table, _ = events
    dates = pc.cast(pc.strptime(table["dt"], format="%Y-%m-%d", unit="s"), pa.date32())
    path = tmp_path / "events.parquet"
    pq.write_table(table.drop_columns(["dt", "event_ts"]).append_column("dt", dates), path)  # dt alone cuts the history
    run_infer(cfg(str(path), tmp_path / "a", date=dt.date(2024, 5, 2)), bundle, "7")
    assert as_dict(read_recommendations(str(tmp_path / "a"), "latest")) == expected(bundle, table, 10, last=DATES[1])
    run_infer(cfg(str(path), tmp_path / "b", history_days=1), bundle, "7")
    assert as_dict(read_recommendations(str(tmp_path / "b"), "latest")) == expected(bundle, table, 10, first=DATES[2])
    bad = tmp_path / "int-dt.parquet"
    pq.write_table(table.drop_columns(["dt"]).append_column("dt", pa.array([20240501] * table.num_rows)), bad)
    with pytest.raises(DataError, match=r"events column dt has type int64\. Fix: store dt as YYYY-MM-DD strings or as dates"):
        run_infer(cfg(str(bad), tmp_path / "c"), bundle, "7")
    assert _published(tmp_path / "c") == []


def test_too_many_shards_is_a_clear_error_and_publishes_nothing(tmp_path: Path, bundle: ModelBundle,
                                                                events: tuple[pa.Table, str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import resource

    table, uri = events
    run_infer(cfg(uri, tmp_path), bundle, "7")
    before = _published(tmp_path)
    monkeypatch.setattr(resource, "getrlimit", lambda _: (16, 16))  # room for 8 spill files
    assert spill.max_spill_shards() == 8
    with pytest.raises(DataError, match=r"need \d+ spill files open at once, more than the 8 allowed.*"
                                        r"Fix: pass --shard-events (\d+) or more"):
        run_infer(cfg(uri, tmp_path, shard_events=10), bundle, "8")
    assert _published(tmp_path) == before
    need = -(-table.num_rows // 8)
    assert run_infer(cfg(uri, tmp_path, shard_events=need), bundle, "8")["shards"] <= 8  # the suggested value works


def test_spill_closes_the_files_it_opened_when_one_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    real = pa.ipc.new_stream
    opened: list[pa.ipc.RecordBatchStreamWriter] = []  # held here, so garbage collection cannot close them

    def new_stream(sink: pa.NativeFile, schema: pa.Schema) -> pa.ipc.RecordBatchStreamWriter:
        if len(opened) == 3:
            raise OSError(24, "Too many open files")
        opened.append(real(sink, schema))
        return opened[-1]

    open_before = len(os.listdir("/proc/self/fd"))
    spilled = spill.Spill(tmp_path, 10, pa.int64())
    spilled.close()  # closed while the Spill lives on (as it does in run_local): no descriptor left open
    assert len(os.listdir("/proc/self/fd")) == open_before
    monkeypatch.setattr(pa.ipc, "new_stream", new_stream)
    with pytest.raises(OSError, match="Too many open files"):
        spill.Spill(tmp_path, 10, pa.int64())
    assert len(opened) == 3 and len(os.listdir("/proc/self/fd")) == open_before


def test_retention_drops_older_dates_after_the_publish(tmp_path: Path, bundle: ModelBundle,
                                                       events: tuple[pa.Table, str]) -> None:
    """retention_days: the publish of DAY drops dates before DAY - retention (one more commit; the table's history
    keeps them restorable); dates inside the window and DAY itself stay. Replaces the S3 expiry rule."""
    from pipeline.serving.recs import committed_dates
    from pipeline.serving.restore import HistoryJob, RestoreJob

    _, uri = events
    old, kept = DAY - dt.timedelta(days=2), DAY - dt.timedelta(days=1)  # the events span DAY - 2 .. DAY
    for day in (old, kept):
        run_infer(cfg(uri, tmp_path, date=day), bundle, "7")
    assert committed_dates(str(tmp_path)) == [kept, old]
    run_infer(cfg(uri, tmp_path, retention_days=1), bundle, "7")  # keeps DAY - 1 and later
    assert committed_dates(str(tmp_path)) == [DAY, kept]
    assert HistoryJob(out=str(tmp_path), date=old).run().commits[0].operation == "drop"
    RestoreJob(out=str(tmp_path), date=old).run()  # a dropped date comes back within the vacuum's retention
    assert committed_dates(str(tmp_path)) == [DAY, kept, old]


def test_retention_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="retention_days"):
        cfg("unused", tmp_path, retention_days=0)
