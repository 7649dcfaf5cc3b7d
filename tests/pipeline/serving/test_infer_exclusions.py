"""Per-user exclusions in the daily scoring (InferOptions.exclusions, issue 29): a user's excluded titles leave
that user's list only (refilled from the model's next items, then popular unseen ones, never with an excluded
title, also in the popularity fallback), both engines agree, the counts reach the manifest and InferResult, and a
bad list is refused before anything is published."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
from infer_support import FALLBACK_USER, N_ITEMS, events_with_a_fallback_user, put_back_list, run_infer, tiny_bundle

from pipeline.errors import DataError
from pipeline.io.bundle import ModelBundle
from pipeline.serving import availability
from pipeline.serving.job import InferJob, publish_recommendations
from pipeline.serving.recs import read_recommendations

DAY = dt.date(2024, 5, 3)
TOP_N = 8


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    return tiny_bundle()


@pytest.fixture(scope="module")
def events(tmp_path_factory: pytest.TempPathFactory) -> tuple[pa.Table, str]:
    return events_with_a_fallback_user(tmp_path_factory.mktemp("events"))


def job(events_uri: str, out: Path, **kw: object) -> InferJob:
    base: dict[str, object] = {"date": DAY, "events": events_uri, "out": str(out), "device": "cpu", "progress": False,
                               "shard_events": 100, "top_n": TOP_N, "precision": "fp32", "cold_slots": 0}
    return InferJob(**(base | kw))  # type: ignore[arg-type]


def write_pairs(path: Path, pairs: list[tuple[int, int]], columns: tuple[str, str] = ("user_id", "item_id")) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    users, items = zip(*pairs, strict=True) if pairs else ((), ())
    pq.write_table(pa.table({columns[0]: pa.array(users, pa.int64()), columns[1]: pa.array(items, pa.int64())}), path)
    return str(path)


def published(out: Path) -> dict[int, dict]:
    return {r["user_id"]: r for r in read_recommendations(str(out), "latest").to_pylist()}


def histories(bundle: ModelBundle, table: pa.Table) -> dict[int, set[int]]:
    index = bundle.item_index()
    out: dict[int, set[int]] = {}
    for u, it in zip(table["user_id"].to_pylist(), table["item_id"].to_pylist(), strict=True):
        out.setdefault(u, set())
        if it in index:
            out[u].add(index[it])
    return out


def full_ranking(bundle: ModelBundle, seen: set[int]) -> list[int]:
    x = sp.csr_matrix((np.ones(len(seen), np.float32), (np.zeros(len(seen), int), sorted(seen))), shape=(1, bundle.n_items))
    top, scores = bundle.recommend(x, bundle.n_items)
    return [int(c) for c, s in zip(top[0], scores[0], strict=True) if s > -np.inf]


def popular(bundle: ModelBundle) -> list[int]:
    return [int(c) for c in bundle.fallback(bundle.n_items)[0]]


def test_an_excluded_top_item_leaves_only_that_users_list(tmp_path: Path, bundle: ModelBundle, events) -> None:
    table, uri = events
    run_infer(job(uri, tmp_path / "plain"), bundle, "1")
    before = published(tmp_path / "plain")
    seen, ids = histories(bundle, table), bundle.item_ids
    users = sorted(u for u in before if seen[u])
    u, v = users[0], users[1]
    top_u, top_v = before[u]["item_ids"][0], before[v]["item_ids"][:3]  # v: its three best items
    pop_top = int(ids[popular(bundle)[0]])
    write_pairs(tmp_path / "ex" / "dt=2024-05-03" / "part-0.parquet",
                [(u, top_u), (u, top_u), (v, top_v[0]), (v, top_v[1]), (v, top_v[2]),
                 (FALLBACK_USER, pop_top), (u, 999_999), (77_777, int(ids[0]))])
    r = publish_recommendations(job(uri, tmp_path / "out", exclusions=str(tmp_path / "ex" / "dt=2024-05-03")),
                                bundle, "1")
    after = published(tmp_path / "out")
    index = bundle.item_index()
    # u: its top item gone, the list still N long: the model's next items, in its order
    assert top_u not in after[u]["item_ids"] and len(after[u]["item_ids"]) == TOP_N
    assert [index[i] for i in after[u]["item_ids"]] == [c for c in full_ranking(bundle, seen[u]) if c != index[top_u]][:TOP_N]
    assert after[u]["item_ids"][:TOP_N - 1] == before[u]["item_ids"][1:]
    assert not set(top_v) & set(after[v]["item_ids"]) and len(after[v]["item_ids"]) == TOP_N
    assert after[v]["item_ids"][:TOP_N - 3] == before[v]["item_ids"][3:]
    # the fallback user: the popular list without its excluded title
    assert after[FALLBACK_USER]["fallback"] and pop_top not in after[FALLBACK_USER]["item_ids"]
    assert after[FALLBACK_USER]["item_ids"] == [int(ids[c]) for c in popular(bundle) if int(ids[c]) != pop_top][:TOP_N]
    # everyone else exactly as without the list
    assert after.keys() == before.keys()
    for w in set(before) - {u, v, FALLBACK_USER}:
        assert after[w] == before[w], w
    m = r.manifest()
    assert (m["exclusions"], m["exclusions_listed"], m["exclusions_unknown_items"], m["exclusions_duplicates"]) == (
        6, 8, 1, 1)  # 77_777 is not active: listed and known, but nobody's list
    assert (m["exclusions_users"], m["exclusions_backfilled_users"], m["exclusions_short_users"]) == (3, 0, 0)
    assert m["exclusions_uri"].endswith("dt=2024-05-03")
    assert (r.exclusions, r.exclusions_unknown_items, r.exclusions_users, r.exclusions_backfilled_users,
            r.exclusions_short_users) == (6, 1, 3, 0, 0)


def test_no_list_and_an_empty_list_give_the_same_output(tmp_path: Path, bundle: ModelBundle, events) -> None:
    _, uri = events
    m0 = run_infer(job(uri, tmp_path / "none"), bundle, "1")
    m1 = run_infer(job(uri, tmp_path / "empty", exclusions=write_pairs(tmp_path / "e.parquet", [])), bundle, "1")
    assert published(tmp_path / "none") == published(tmp_path / "empty")
    assert not any(k.startswith("exclusions") for k in m0)
    assert (m1["exclusions"], m1["exclusions_users"]) == (0, 0)


def test_excluded_items_are_never_backfilled(tmp_path: Path, bundle: ModelBundle, events,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """No extra candidates: a user whose whole top N is excluded is refilled from popular unseen titles, and
    those skip the user's excluded ones too (here also the most popular titles)."""
    monkeypatch.setattr(availability, "OVERFETCH", 0)
    table, uri = events
    seen, ids, index = histories(bundle, table), bundle.item_ids, bundle.item_index()
    u = next(u for u in sorted(seen) if seen[u] and u != FALLBACK_USER)
    ranking = full_ranking(bundle, seen[u])
    blocked = set(ranking[:TOP_N]) | {c for c in popular(bundle)[:6] if c not in seen[u]}
    listed = write_pairs(tmp_path / "x.parquet", [(u, int(ids[c])) for c in sorted(blocked)])
    r = publish_recommendations(job(uri, tmp_path / "out", exclusions=listed), bundle, "2")
    got = [index[i] for i in published(tmp_path / "out")[u]["item_ids"]]
    assert len(got) == TOP_N and not set(got) & blocked and not set(got) & seen[u]
    assert got == [c for c in popular(bundle) if c not in seen[u] and c not in blocked][:TOP_N]
    assert r.exclusions_backfilled_users == 1 == r.manifest()["exclusions_backfilled_users"]


def test_a_user_who_excludes_nearly_everything_gets_the_rest(tmp_path: Path, bundle: ModelBundle, events) -> None:
    table, uri = events
    seen, ids, index = histories(bundle, table), bundle.item_ids, bundle.item_index()
    u = next(u for u in sorted(seen) if seen[u])
    left = [c for c in range(N_ITEMS) if c not in seen[u]][:3]
    listed = write_pairs(tmp_path / "x.parquet", [(u, int(ids[c])) for c in range(N_ITEMS) if c not in left])
    r = publish_recommendations(job(uri, tmp_path / "out", exclusions=listed), bundle, "3")
    assert {index[i] for i in published(tmp_path / "out")[u]["item_ids"]} == set(left)
    assert r.exclusions_short_users == 1  # only that user: others are not short


def test_with_availability_both_apply(tmp_path: Path, bundle: ModelBundle, events) -> None:
    table, uri = events
    seen, ids, index = histories(bundle, table), bundle.item_ids, bundle.item_index()
    allowed = set(range(0, N_ITEMS, 2))
    avail = tmp_path / "a.parquet"
    pq.write_table(pa.table({"item_id": pa.array([int(ids[c]) for c in sorted(allowed)], pa.int64())}), avail)
    users = [u for u in sorted(seen) if seen[u]][:5]
    blocked = {u: [c for c in full_ranking(bundle, seen[u]) if c in allowed][:2] for u in users}
    listed = write_pairs(tmp_path / "x.parquet", [(u, int(ids[c])) for u, cs in blocked.items() for c in cs])
    r = publish_recommendations(job(uri, tmp_path / "out", availability=str(avail), exclusions=listed), bundle, "4")
    out = published(tmp_path / "out")
    for u, row in out.items():
        got = {index[i] for i in row["item_ids"]}
        assert got <= allowed and not got & set(blocked.get(u, [])), u
    assert r.exclusions_users == 5 and r.manifest()["available_items"] == len(allowed)


def test_the_output_check_refuses_an_excluded_item(tmp_path: Path, bundle: ModelBundle, events,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Defence in depth: a part holding a user's excluded item is refused even if scoring let it through."""
    from pipeline.serving import checks

    _, uri = events
    out = tmp_path / "out"
    run_infer(job(uri, out), bundle, "5")
    before = published(out)
    u = next(u for u in sorted(before) if not before[u]["fallback"])
    put_back_list(monkeypatch, u, before)  # u's list as it was without the exclusion
    listed = write_pairs(tmp_path / "x.parquet", [(u, before[u]["item_ids"][0])])
    with pytest.raises(checks.OutputCheckError, match="on that user's exclusion list"):
        publish_recommendations(job(uri, out, exclusions=listed), bundle, "6")
    assert published(out) == before


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("case", ["missing", "no_user_id", "future"])
def test_bad_lists_are_refused_before_anything_is_published(tmp_path: Path, bundle: ModelBundle, events,
                                                            case: str) -> None:
    _, uri = events
    out = tmp_path / "out"
    first = publish_recommendations(job(uri, out), bundle, "7")
    before, files = read_recommendations(str(out), DAY), files_under(out)
    lists = {"missing": lambda: str(tmp_path / "nowhere.parquet"),
             "no_user_id": lambda: write_pairs(tmp_path / "n.parquet", [(1, 1000)], columns=("member", "item_id")),
             "future": lambda: str(Path(write_pairs(tmp_path / "ex" / "dt=2024-05-04" / "p.parquet", [(1, 1000)])).parent)}
    with pytest.raises(DataError) as e:
        publish_recommendations(job(uri, out, exclusions=lists[case]()), bundle, "8")
    assert "\n" not in str(e.value) and e.value.problem and e.value.fix
    expected = {"missing": "no exclusion list at", "no_user_id": "lacks user_id",
                "future": "dated 2024-05-04, after the job's date"}[case]
    assert expected in e.value.problem
    assert files_under(out) == files  # no run folder left behind, no commit
    after = read_recommendations(str(out), DAY)
    assert after.equals(before) and set(after.column("model_version").to_pylist()) == {"7"}
    assert first.version == publish_recommendations(job(uri, out), bundle, "7").version - 1  # nothing committed between


@pytest.mark.slow
def test_spark_engine_excludes_like_the_local_engine(tmp_path: Path, bundle: ModelBundle, events, spark) -> None:
    table, uri = events
    seen, ids = histories(bundle, table), bundle.item_ids
    active = [u for u in sorted(seen) if seen[u]]
    rng = np.random.default_rng(5)
    pairs = [(u, int(ids[c])) for u in active[::3] for c in full_ranking(bundle, seen[u])[:int(rng.integers(1, 12))]]
    pairs += [(FALLBACK_USER, int(ids[popular(bundle)[0]])), (active[1], 999_999)]
    listed = write_pairs(tmp_path / "x.parquet", pairs)
    a = run_infer(job(uri, tmp_path / "local", exclusions=listed), bundle, "9")
    b = run_infer(job(uri, tmp_path / "spark", exclusions=listed, engine="spark"), bundle, "9")
    for key in ("exclusions", "exclusions_users", "exclusions_unknown_items", "exclusions_backfilled_users",
                "exclusions_short_users", "fallback_users"):
        assert a[key] == b[key], key
    assert a["exclusions_users"] == len(active[::3]) + 1  # and the fallback user; active[1] only an unknown item
    la, lb = published(tmp_path / "local"), published(tmp_path / "spark")
    assert la.keys() == lb.keys()
    for u, r in la.items():
        assert r["item_ids"] == lb[u]["item_ids"], u
    excluded = {(u, i) for u, i in pairs}
    assert not any((u, i) in excluded for u, r in lb.items() for i in r["item_ids"])
    with pytest.raises(DataError, match="no exclusion list at"):  # refused on the driver, nothing published
        publish_recommendations(job(uri, tmp_path / "spark", exclusions=str(tmp_path / "nowhere"), engine="spark"),
                                bundle, "10")
    assert published(tmp_path / "spark") == lb


def test_cli_passes_exclusions(tmp_path: Path, bundle: ModelBundle, events, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.cli.main import main

    _, uri = events
    model = str(bundle.save(tmp_path / "bundle"))
    args = ["infer", "--date", "2024-05-03", "--events", uri, "--out", str(tmp_path / "out"), "--model", model,
            "--device", "cpu", "--no-progress", "--top-n", "5", "--precision", "fp32"]
    listed = write_pairs(tmp_path / "x.parquet", [(0, 1000 + c) for c in range(N_ITEMS)])  # user 0: everything
    assert main([*args, "--exclusions", listed]) == 0
    assert "exclusions: 40 pairs" in capsys.readouterr().out
    rows = {r["user_id"]: r for r in read_recommendations(str(tmp_path / "out"), DAY).to_pylist()}
    assert rows[0]["item_ids"] == [] and len(rows[1]["item_ids"]) == 5
    assert main([*args, "--exclusions", str(tmp_path / "nowhere")]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("recsys infer: error: no exclusion list at ") and ". Fix: " in line
