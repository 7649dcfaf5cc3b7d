"""Availability at serving (pipeline.serving.availability, issue 29): lists hold only available items (model
items first, then popular available unseen ones), fallback users get only available popular items, short lists
are backfilled and counted in the manifest, no list = the same output as before, and each bad list is refused
with a one-line DataError while the date's previous output stays served."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
from infer_support import FALLBACK_USER, N_ITEMS, events_with_a_fallback_user, run_infer, tiny_bundle

from pipeline.errors import DataError
from pipeline.io.bundle import ModelBundle
from pipeline.serving import availability
from pipeline.serving.job import InferJob, publish_recommendations
from pipeline.serving.recs import read_recommendations

DAY = dt.date(2024, 5, 3)


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    return tiny_bundle()


@pytest.fixture(scope="module")
def events(tmp_path_factory: pytest.TempPathFactory) -> tuple[pa.Table, str]:
    return events_with_a_fallback_user(tmp_path_factory.mktemp("events"))


def job(events_uri: str, out: Path, **kw: object) -> InferJob:
    base: dict[str, object] = {"date": DAY, "events": events_uri, "out": str(out), "device": "cpu", "progress": False,
                               "shard_events": 100, "top_n": 8, "precision": "fp32"}
    return InferJob(**(base | kw))  # type: ignore[arg-type]


def write_list(path: Path, ids: list, column: str = "item_id") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({column: pa.array(ids, pa.int64())}), path)
    return str(path)


def histories(bundle: ModelBundle, table: pa.Table) -> dict[int, set[int]]:
    """user → model columns seen up to DAY (every date of the events is ≤ DAY)."""
    index = bundle.item_index()
    out: dict[int, set[int]] = {}
    for u, it in zip(table["user_id"].to_pylist(), table["item_id"].to_pylist(), strict=True):
        out.setdefault(u, set())
        if it in index:
            out[u].add(index[it])
    return out


def published(out: Path) -> dict[int, dict]:
    return {r["user_id"]: r for r in read_recommendations(str(out), "latest").to_pylist()}


def full_ranking(bundle: ModelBundle, seen: set[int]) -> list[int]:
    x = sp.csr_matrix((np.ones(len(seen), np.float32), (np.zeros(len(seen), int), sorted(seen))), shape=(1, bundle.n_items))
    top, scores = bundle.recommend(x, bundle.n_items)
    return [int(c) for c, s in zip(top[0], scores[0], strict=True) if s > -np.inf]


def popular(bundle: ModelBundle) -> list[int]:
    return [int(c) for c in bundle.fallback(bundle.n_items)[0]]


def test_no_list_and_a_full_list_give_the_same_output(tmp_path: Path, bundle: ModelBundle, events) -> None:
    table, uri = events
    m0 = run_infer(job(uri, tmp_path / "none"), bundle, "1")
    every = write_list(tmp_path / "all.parquet", [int(i) for i in bundle.item_ids])
    m1 = run_infer(job(uri, tmp_path / "all", availability=every), bundle, "1")
    a, b = published(tmp_path / "none"), published(tmp_path / "all")
    assert a == b and len(a) == 61 and a[FALLBACK_USER]["fallback"]
    assert not any(k.startswith("availability") for k in m0)  # None: today's manifest, nothing added
    assert m1["available_items"] == N_ITEMS and m1["availability_backfilled_users"] == 0
    # and None is still the plain model ranking (not only "equal to itself")
    seen = histories(bundle, table)
    u = next(u for u in a if seen[u])
    assert [bundle.item_index()[i] for i in a[u]["item_ids"]] == full_ranking(bundle, seen[u])[:8]


def test_lists_hold_only_available_items_model_first(tmp_path: Path, bundle: ModelBundle, events,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(availability, "OVERFETCH", 100)  # rank everything: the lists are exactly the filtered ranking
    table, uri = events
    rng = np.random.default_rng(3)
    cols = sorted(rng.choice(N_ITEMS, 24, replace=False).tolist())
    ids = [int(bundle.item_ids[c]) for c in cols]
    listed = write_list(tmp_path / "avail" / "dt=2024-05-03" / "part-0.parquet", ids + ids[:3] + [5_555_555])
    r = publish_recommendations(job(uri, tmp_path / "out", availability=str(tmp_path / "avail" / "dt=2024-05-03")),
                                bundle, "2")
    m = r.manifest()
    assert listed and (m["available_items"], m["availability_unknown_ids"], m["availability_duplicate_ids"]) == (24, 1, 3)
    assert (r.availability_backfilled_users, r.availability_short_users) == (
        m["availability_backfilled_users"], m["availability_short_users"]) == (0, 0)
    out, seen, allowed = published(tmp_path / "out"), histories(bundle, table), set(cols)
    index = bundle.item_index()
    for u, row in out.items():
        got = [index[i] for i in row["item_ids"]]
        assert set(got) <= allowed, u
        assert row["fallback"] == (not seen[u])
        if row["fallback"]:
            assert got == [c for c in popular(bundle) if c in allowed][:8]
        else:
            assert got == [c for c in full_ranking(bundle, seen[u]) if c in allowed][:8], u


def test_short_model_lists_are_backfilled_from_popular_available_unseen(tmp_path: Path, bundle: ModelBundle, events,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(availability, "OVERFETCH", 0)  # no extra candidates: each unavailable top item needs a backfill
    table, uri = events
    cols = list(range(0, N_ITEMS, 2))
    r = publish_recommendations(
        job(uri, tmp_path / "out", availability=write_list(tmp_path / "a.parquet", [int(bundle.item_ids[c]) for c in cols])),
        bundle, "3")
    m = r.manifest()
    assert m["availability_backfilled_users"] > 0 and r.availability_backfilled_users == m["availability_backfilled_users"]
    out, seen, allowed, index = published(tmp_path / "out"), histories(bundle, table), set(cols), bundle.item_index()
    for u, row in out.items():
        if row["fallback"]:
            continue
        got = [index[i] for i in row["item_ids"]]
        model = [c for c in full_ranking(bundle, seen[u])[:8] if c in allowed]
        backfill = [c for c in popular(bundle) if c in allowed and c not in seen[u] and c not in model]
        assert got == (model + backfill)[:8], u  # documented order: model items, then popular available unseen
        assert len(got) == min(8, len(allowed - seen[u]))
        assert all(np.diff(row["scores"]) <= 0)


def test_users_with_fewer_than_n_available_items_are_counted(tmp_path: Path, bundle: ModelBundle, events) -> None:
    table, uri = events
    cols = [0, 1, 2]
    r = publish_recommendations(
        job(uri, tmp_path / "out", availability=write_list(tmp_path / "a.parquet", [int(bundle.item_ids[c]) for c in cols])),
        bundle, "4")
    out, seen, index = published(tmp_path / "out"), histories(bundle, table), bundle.item_index()
    for u, row in out.items():
        got = [index[i] for i in row["item_ids"]]
        assert set(got) == set(cols) - seen[u], u
    assert r.availability_short_users == len(out) == r.manifest()["availability_short_users"]


@pytest.mark.parametrize("case", ["unknown_only", "empty", "missing", "no_item_id", "future"])
def test_bad_lists_are_refused_and_the_previous_output_stays(tmp_path: Path, bundle: ModelBundle, events, case: str) -> None:
    _, uri = events
    out = tmp_path / "out"
    first = publish_recommendations(job(uri, out), bundle, "5")
    before = read_recommendations(str(out), DAY)
    lists = {"unknown_only": lambda: write_list(tmp_path / "u.parquet", [7_777_777, 8_888_888]),
             "empty": lambda: write_list(tmp_path / "e.parquet", []),
             "missing": lambda: str(tmp_path / "nowhere.parquet"),
             "no_item_id": lambda: write_list(tmp_path / "n.parquet", [1000, 1001], column="title_id"),
             "future": lambda: str(Path(write_list(tmp_path / "av" / "dt=2024-05-04" / "p.parquet", [1000])).parent)}
    with pytest.raises(DataError) as e:
        publish_recommendations(job(uri, out, availability=lists[case]()), bundle, "6")
    assert "\n" not in str(e.value) and e.value.problem and e.value.fix
    expected = {"unknown_only": "none of the 2 item ids", "empty": "is empty", "missing": "no availability list",
                "no_item_id": "lacks an item_id column", "future": "dated 2024-05-04, after the job's date"}[case]
    assert expected in e.value.problem
    after = read_recommendations(str(out), DAY)
    assert after.equals(before) and set(after.column("model_version").to_pylist()) == {"5"}
    assert first.version == publish_recommendations(job(uri, out), bundle, "5").version - 1  # nothing was committed between


def test_a_list_dated_today_or_earlier_is_accepted(tmp_path: Path, bundle: ModelBundle) -> None:
    vocab = pa.array(bundle.item_ids.astype(np.int64))
    path = write_list(tmp_path / "dt=2024-05-02" / "p.parquet", [1000, 1000, 1001, 42])
    a = availability.load_availability(str(tmp_path / "dt=2024-05-02"), DAY, vocab)
    assert (int(a.mask.sum()), a.unknown, a.duplicates, a.listed) == (2, 1, 1, 4) and path


@pytest.mark.slow
def test_spark_engine_restricts_like_the_local_engine(tmp_path: Path, bundle: ModelBundle, events, spark) -> None:
    _, uri = events
    listed = write_list(tmp_path / "a.parquet", [int(bundle.item_ids[c]) for c in range(0, N_ITEMS, 3)])
    a = run_infer(job(uri, tmp_path / "local", availability=listed), bundle, "7")
    b = run_infer(job(uri, tmp_path / "spark", availability=listed, engine="spark"), bundle, "7")
    for key in ("available_items", "availability_backfilled_users", "availability_short_users", "fallback_users"):
        assert a[key] == b[key], key
    la, lb = published(tmp_path / "local"), published(tmp_path / "spark")
    assert la.keys() == lb.keys()
    for u, r in la.items():
        assert r["item_ids"] == lb[u]["item_ids"], u


def test_cli_passes_availability(tmp_path: Path, bundle: ModelBundle, events, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.cli.main import main

    _, uri = events
    model = str(bundle.save(tmp_path / "bundle"))
    listed = write_list(tmp_path / "a.parquet", [1000, 1001, 1002])
    args = ["infer", "--date", "2024-05-03", "--events", uri, "--out", str(tmp_path / "out"), "--model", model,
            "--device", "cpu", "--no-progress", "--top-n", "5", "--precision", "fp32"]
    assert main([*args, "--availability", listed]) == 0
    assert "availability: " in capsys.readouterr().out
    rows = read_recommendations(str(tmp_path / "out"), DAY).to_pylist()
    assert rows and all(set(r["item_ids"]) <= {1000, 1001, 1002} for r in rows)
    assert main([*args, "--availability", str(tmp_path / "nowhere")]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("recsys infer: error: no availability list at ") and ". Fix: " in line


def test_the_output_check_refuses_an_unavailable_item(tmp_path: Path, bundle: ModelBundle, events,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Defence in depth: a part holding an unavailable item is refused even if scoring let it through."""
    from pipeline.serving import checks

    def corrupt(table: pa.Table) -> pa.Table:  # every listed item becomes column 39, which is not available
        items = table.column("item_ids").combine_chunks()
        bad = pa.ListArray.from_arrays(items.offsets, pa.array(np.full(len(items.values), 1039, np.int64)))
        return table.set_column(table.schema.get_field_index("item_ids"), "item_ids", bad)

    _, uri = events
    monkeypatch.setattr(checks, "finalize_part", corrupt)
    listed = write_list(tmp_path / "a.parquet", list(range(1000, 1020)))
    with pytest.raises(checks.OutputCheckError, match="not in the date's availability list"):
        publish_recommendations(job(uri, tmp_path / "out", availability=listed), bundle, "8")
