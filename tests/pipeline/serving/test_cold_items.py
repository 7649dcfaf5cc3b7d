"""New titles at serving (pipeline.serving.cold_items, issue 29): a bundle with a cold head (model.cold_head, saved
by pipeline.io.cold_head) scores the day's new items from their metadata; they reach the lists of the users who
clicked similar items (EASE + MARec head: by score; autoencoder + metadata head: the last slots), never when
unavailable; a missing items file is a warning and warm-only output; a bad one a DataError with nothing published;
a bundle without a head serves as before."""

from __future__ import annotations

import datetime as dt
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
from infer_support import N_ITEMS, events_table, item_ids, put_back_list, run_infer, tiny_bundle, write_events

from model.cold_head import ColdHeadConfig, build_cold_head, default_blocks
from model.ease import EASEConfig
from model.recommenders import make_recommender
from pipeline.data.item_features import default_blocks as data_default_blocks
from pipeline.errors import DataError
from pipeline.io.bundle import ModelBundle
from pipeline.io.items import items_uri
from pipeline.serving.job import InferJob, publish_recommendations
from pipeline.serving.recs import read_recommendations

DAY = dt.date(2024, 5, 3)
TOP_N = 8
GENRES = ("drama", "comedy", "action", "horror")
NEW, NEW_OTHER = 5000, 5001  # a new "drama" title, and a new title with a genre nobody has
NEW_COMEDY = 5002  # a second new title some drama clickers are close to (the exclusion tests' next best)


def genre(c: int) -> str:
    return GENRES[c % len(GENRES)]


def warm_metadata() -> dict[str, list]:
    return {"tags": [[genre(c), "film"] for c in range(N_ITEMS)]}


def train_matrix() -> sp.csr_matrix:
    rng = np.random.default_rng(0)
    return sp.csr_matrix((rng.random((150, N_ITEMS)) < 0.2).astype(np.float32))


@pytest.fixture(scope="module")
def ease_bundle(tmp_path_factory: pytest.TempPathFactory) -> ModelBundle:
    """EASE + MARec cold head, saved and loaded back (what serving gets from the registry)."""
    x = train_matrix()
    rec = make_recommender("ease", ease=EASEConfig(l2=5.0)).fit(x)
    head = build_cold_head(rec, x, warm_metadata(), ColdHeadConfig(delta=1.0, ab=50.0, mu=(1.0,)))
    b = ModelBundle(rec, item_ids(), np.asarray(x.sum(0)).ravel().astype(np.float32), "ease", {}, "snap", head)
    return ModelBundle.load(b.save(tmp_path_factory.mktemp("bundle") / "b"), "cpu")


@pytest.fixture(scope="module")
def vae_bundle() -> ModelBundle:
    b = tiny_bundle()
    b.cold_head = build_cold_head(b.recommender, train_matrix(), warm_metadata(), ColdHeadConfig(delta=1.0))
    return b


@pytest.fixture(scope="module")
def events(tmp_path_factory: pytest.TempPathFactory) -> tuple[pa.Table, str]:
    table = events_table(n_users=60)
    return table, write_events(table, str(tmp_path_factory.mktemp("events")))


def write_items(out: Path, rows: list[tuple[int, list[str] | None]], day: dt.date = DAY) -> str:
    """The day's items under the lake as `recsys ingest --format items` puts them (<out>/items/dt=D/items.parquet)."""
    folder = Path(items_uri(str(out), day))
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"item_id": pa.array([r[0] for r in rows], pa.int64()),
                             "title": pa.array([f"t{r[0]}" for r in rows]),
                             "tags": pa.array([r[1] for r in rows], pa.list_(pa.string()))}), folder / "items.parquet")
    return str(folder)


def todays_items() -> list[tuple[int, list[str] | None]]:
    warm = [(1000 + c, [genre(c), "film"]) for c in range(N_ITEMS)]
    return [*warm, (NEW, ["drama", "film"]), (NEW_OTHER, ["musical"])]


def job(events_uri: str, out: Path, **kw: object) -> InferJob:
    base: dict[str, object] = {"date": DAY, "events": events_uri, "out": str(out), "device": "cpu", "progress": False,
                               "shard_events": 100, "top_n": TOP_N, "precision": "fp32"}
    return InferJob(**(base | kw))


def histories(table: pa.Table) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for u, it in zip(table["user_id"].to_pylist(), table["item_id"].to_pylist(), strict=True):
        out.setdefault(u, [])
        if 1000 <= it < 1000 + N_ITEMS and it - 1000 not in out[u]:
            out[u].append(it - 1000)
    return out


def published(out: Path) -> dict[int, dict]:
    return {r["user_id"]: r for r in read_recommendations(str(out), DAY).to_pylist()}


def test_default_blocks_agree_with_the_data_layer() -> None:
    for cols in (["tags"], ["tags", "genres", "year", "plot", "members"], ["type", "description", "actors"]):
        assert default_blocks(cols) == data_default_blocks(cols)


def test_a_new_title_reaches_similar_users_by_marec_score(tmp_path: Path, ease_bundle: ModelBundle, events) -> None:
    table, uri = events
    write_items(tmp_path, todays_items())
    m = run_infer(job(uri, tmp_path, cold_slots=2), ease_bundle, "1")
    assert (m["cold_items_new"], m["cold_items_scored"], m["cold_head"], m["cold_items_reason"]) == (2, 2, "marec", None)
    out = published(tmp_path)
    head = ease_bundle.cold_head
    assert head is not None
    c = head.cold_columns(head.encode({"tags": [["drama", "film"]]}, 1), ease_bundle.recommender.weights)[:, 0]  # type: ignore[attr-defined]
    expect = set()
    for u, cols in histories(table).items():
        if not cols:
            continue
        x = sp.csr_matrix((np.ones(len(cols), np.float32), (np.zeros(len(cols), int), cols)), shape=(1, N_ITEMS))
        _, warm = ease_bundle.recommend(x, TOP_N)
        cold = float((x @ c)[0])
        if cold > 0 and cold > warm[0, -1]:  # MARec ranks it inside the top N
            expect.add(u)
            row = out[u]
            pos = row["item_ids"].index(NEW)
            assert row["scores"][pos] == pytest.approx(cold, rel=1e-4)
    got = {u for u, r in out.items() if NEW in r["item_ids"]}
    assert got == expect and len(got) >= 5  # exactly the users MARec's own ranking puts it in front of
    assert all(NEW_OTHER not in r["item_ids"] for r in out.values())  # no similar click: never shown
    assert m["cold_items_shown"] == 1 and m["cold_users"] == len(got)
    r = publish_recommendations(job(uri, tmp_path, cold_slots=2), ease_bundle, "1")
    assert (r.cold_items_scored, r.cold_items_shown, r.cold_users) == (2, 1, len(got))


def test_autoencoder_gets_new_titles_in_the_last_slots(tmp_path: Path, vae_bundle: ModelBundle, events) -> None:
    table, uri = events
    write_items(tmp_path, todays_items())
    m = run_infer(job(uri, tmp_path, cold_slots=1), vae_bundle, "1")
    assert m["cold_head"] == "eq5"
    out = published(tmp_path)
    drama_clickers = {u for u, cols in histories(table).items() if any(genre(c) == "drama" for c in cols)}
    for u, row in out.items():
        if u in drama_clickers:  # a positive metadata score: the last slot, below the model's items
            assert row["item_ids"][-1] == NEW and NEW not in row["item_ids"][:-1]
            assert row["scores"][-1] < row["scores"][-2]
        else:
            assert NEW not in row["item_ids"]
    assert m["cold_users"] == len(drama_clickers) > 0 and m["cold_items_shown"] == 1
    # the model's own items keep their order: the list without its last slot is the warm list's head
    warm = tmp_path / "warm"
    run_infer(job(uri, warm, cold_slots=0), vae_bundle, "1")
    w = published(warm)
    for u in drama_clickers:
        assert out[u]["item_ids"][:-1] == w[u]["item_ids"][:TOP_N - 1]


def test_an_unavailable_new_title_is_never_shown(tmp_path: Path, ease_bundle: ModelBundle, events) -> None:
    _, uri = events
    write_items(tmp_path, todays_items())
    listed = tmp_path / "avail.parquet"
    pq.write_table(pa.table({"item_id": pa.array([*range(1000, 1000 + N_ITEMS), NEW_OTHER], pa.int64())}), listed)
    m = run_infer(job(uri, tmp_path, availability=str(listed)), ease_bundle, "1")
    assert (m["cold_items_new"], m["cold_items_unavailable"], m["cold_items_scored"], m["cold_items_shown"]) == (2, 1, 1, 0)
    assert all(NEW not in r["item_ids"] for r in published(tmp_path).values())


def test_a_missing_items_file_warns_and_serves_warm_items(tmp_path: Path, ease_bundle: ModelBundle, events,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    _, uri = events
    with caplog.at_level(logging.WARNING, logger="pipeline.serving.cold_items"):
        m = run_infer(job(uri, tmp_path / "a"), ease_bundle, "1")
    assert any("no items file" in r.getMessage() for r in caplog.records)
    assert (m["cold_items_scored"], m["cold_items_shown"], m["cold_users"]) == (0, 0, 0)
    assert "no items file at" in m["cold_items_reason"]
    run_infer(job(uri, tmp_path / "b", cold_slots=0), ease_bundle, "1")
    assert published(tmp_path / "a") == published(tmp_path / "b")


@pytest.mark.parametrize("case", ["duplicate", "no_metadata", "not_utf8"])
def test_a_bad_items_file_publishes_nothing(tmp_path: Path, ease_bundle: ModelBundle, events, case: str) -> None:
    _, uri = events
    first = publish_recommendations(job(uri, tmp_path), ease_bundle, "1")  # no items yet: warm lists
    before = read_recommendations(str(tmp_path), DAY)
    folder = Path(items_uri(str(tmp_path), DAY))
    folder.mkdir(parents=True)
    if case == "duplicate":
        write_items(tmp_path, [*todays_items(), (NEW, ["drama"])])
    elif case == "no_metadata":
        write_items(tmp_path, [(NEW, None), (NEW_OTHER, [])])
    else:
        pq.write_table(pa.table({"item_id": pa.array([NEW], pa.int64()), "tags": pa.array([["drama"]]),
                                 "title": pa.array([b"caf\xe9"], pa.binary())}), folder / "items.parquet")
    with pytest.raises(DataError) as e:
        publish_recommendations(job(uri, tmp_path), ease_bundle, "2")
    assert {"duplicate": "appears 2 times", "no_metadata": "no item has tags", "not_utf8": "not valid UTF-8"}[case] \
        in e.value.problem and "\n" not in str(e.value)
    assert read_recommendations(str(tmp_path), DAY).equals(before)
    shutil.rmtree(folder)
    assert publish_recommendations(job(uri, tmp_path), ease_bundle, "1").version == first.version + 1  # nothing between


def test_a_bundle_without_a_cold_head_serves_as_before(tmp_path: Path, ease_bundle: ModelBundle, events) -> None:
    _, uri = events
    plain = ModelBundle(ease_bundle.recommender, ease_bundle.item_ids, ease_bundle.popularity, "ease", {}, "snap")
    loaded = ModelBundle.load(plain.save(tmp_path / "plain"), "cpu")
    assert loaded.cold_head is None
    write_items(tmp_path / "a", todays_items())
    m = run_infer(job(uri, tmp_path / "a"), loaded, "1")
    assert m["cold_items_reason"] == "model has no cold head" and m["cold_items_scored"] == 0
    run_infer(job(uri, tmp_path / "b"), loaded, "1")  # no items file at all
    assert published(tmp_path / "a") == published(tmp_path / "b")


def test_only_known_items_in_the_file_is_a_no_op(tmp_path: Path, ease_bundle: ModelBundle, events) -> None:
    _, uri = events
    write_items(tmp_path, todays_items()[:N_ITEMS])
    m = run_infer(job(uri, tmp_path), ease_bundle, "1")
    assert m["cold_items_new"] == 0 and m["cold_items_reason"].startswith("no new items")


def test_the_cold_head_round_trips_and_is_checksummed(tmp_path: Path, ease_bundle: ModelBundle) -> None:
    d = ease_bundle.save(tmp_path / "b")
    again = ModelBundle.load(d)
    a, b = ease_bundle.cold_head, again.cold_head
    assert a is not None and b is not None
    tags = {"tags": [["drama"], ["comedy", "film"]]}
    w = ease_bundle.recommender.weights  # type: ignore[attr-defined]
    np.testing.assert_array_equal(a.cold_columns(a.encode(tags, 2), w), b.cold_columns(b.encode(tags, 2), w))
    data = bytearray((d / "cold_head.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (d / "cold_head.pt").write_bytes(bytes(data))
    with pytest.raises(DataError, match="checksum"):
        ModelBundle.load(d)


@pytest.mark.slow
def test_spark_engine_merges_like_the_local_engine(tmp_path: Path, ease_bundle: ModelBundle, events, spark) -> None:
    _, uri = events
    for sub in ("local", "spark"):
        write_items(tmp_path / sub, todays_items())
    a = run_infer(job(uri, tmp_path / "local"), ease_bundle, "1")
    b = run_infer(job(uri, tmp_path / "spark", engine="spark"), ease_bundle, "1")
    for key in ("cold_items_scored", "cold_items_shown", "cold_users"):
        assert a[key] == b[key], key
    la, lb = published(tmp_path / "local"), published(tmp_path / "spark")
    assert {u: r["item_ids"] for u, r in la.items()} == {u: r["item_ids"] for u, r in lb.items()}


def test_the_linear_merge_equals_a_stable_sort_of_both_lists() -> None:
    from pipeline.serving.cold_items import _merge_sorted

    rng = np.random.default_rng(0)
    for _ in range(200):
        r, k, c = 5, int(rng.integers(1, 12)), int(rng.integers(1, 4))
        s = rng.integers(-3, 6, (r, k)).astype(np.float32)
        s[rng.random((r, k)) < 0.1] = -np.inf  # padding
        s = -np.sort(-s, axis=1)
        cs = rng.integers(-3, 6, (r, c)).astype(np.float32)
        cs[rng.random((r, c)) < 0.3] = -np.inf  # no positive cold score
        cs = -np.sort(-cs, axis=1)
        t, ct = rng.integers(0, 100, (r, k)), np.tile(1000 + np.arange(c), (r, 1))
        got_t, got_s = _merge_sorted(t, s, ct, cs)
        o = np.argsort(-np.concatenate([s, cs], 1), axis=1, kind="stable")[:, :k]  # ties: the model's item first
        want_s = np.take_along_axis(np.concatenate([s, cs], 1), o, 1)
        want_t = np.take_along_axis(np.concatenate([t, ct], 1), o, 1)
        assert np.array_equal(got_s, want_s) and np.array_equal(got_t[want_s > -np.inf], want_t[want_s > -np.inf])


def write_exclusions(path: Path, pairs: list[tuple[int, int]]) -> str:
    users, items = zip(*pairs, strict=True)
    pq.write_table(pa.table({"user_id": pa.array(users, pa.int64()), "item_id": pa.array(items, pa.int64())}), path)
    return str(path)


def with_comedy() -> list[tuple[int, list[str] | None]]:
    return [*todays_items(), (NEW_COMEDY, ["comedy", "film"])]


@pytest.mark.parametrize("kind", ["ease", "vae"])
def test_an_excluded_new_title_leaves_only_that_users_list(tmp_path: Path, ease_bundle: ModelBundle,
                                                           vae_bundle: ModelBundle, events, kind: str) -> None:
    """Exclusions are resolved against the model's items plus the day's scored new ones: a user who excludes the
    new title gets what a day without it would give them (the next new title, or the model's item), others keep it."""
    _, uri = events
    bundle = ease_bundle if kind == "ease" else vae_bundle
    for sub, items in (("plain", with_comedy()), ("without", [r for r in with_comedy() if r[0] != NEW]),
                       ("out", with_comedy())):
        write_items(tmp_path / sub, items)
    run_infer(job(uri, tmp_path / "plain", cold_slots=1), bundle, "1")
    run_infer(job(uri, tmp_path / "without", cold_slots=1), bundle, "1")
    before, without = published(tmp_path / "plain"), published(tmp_path / "without")
    shown = [u for u in sorted(before) if NEW in before[u]["item_ids"]]
    u = next(u for u in shown if NEW_COMEDY in without[u]["item_ids"])  # its slot goes to its next new title
    u2 = next(u for u in shown if not {NEW_COMEDY, NEW_OTHER} & set(without[u]["item_ids"]))  # back to the model's
    v = next(w for w in shown if w not in (u, u2))
    listed = write_exclusions(tmp_path / "x.parquet", [(u, NEW), (u2, NEW), (v, NEW_OTHER), (v, 999_999)])
    m = run_infer(job(uri, tmp_path / "out", cold_slots=1, exclusions=listed), bundle, "1")
    after = published(tmp_path / "out")
    for w in (u, u2):
        assert NEW not in after[w]["item_ids"] and after[w] == without[w], w
    assert NEW_COMEDY in after[u]["item_ids"]
    assert not any(i >= NEW for i in after[u2]["item_ids"])
    assert NEW in after[v]["item_ids"]
    assert after.keys() == before.keys()
    for w in set(before) - {u, u2}:
        assert after[w] == before[w], w
    # new titles the day scores are known: only the id nobody knows is unknown
    assert (m["exclusions"], m["exclusions_unknown_items"], m["exclusions_users"]) == (3, 1, 3)
    assert m["cold_users"] == sum(any(i >= NEW for i in r["item_ids"]) for r in after.values())


def test_the_output_check_refuses_an_excluded_new_title(tmp_path: Path, ease_bundle: ModelBundle, events,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Defence in depth: a part that shows a user an excluded new title is refused even if the merge let it in."""
    from pipeline.serving import checks

    _, uri = events
    write_items(tmp_path, todays_items())
    run_infer(job(uri, tmp_path), ease_bundle, "1")
    before = published(tmp_path)
    u = next(u for u in sorted(before) if NEW in before[u]["item_ids"])
    put_back_list(monkeypatch, u, before)  # u's list as it was without the exclusion
    listed = write_exclusions(tmp_path / "x.parquet", [(u, NEW)])
    with pytest.raises(checks.OutputCheckError, match="on that user's exclusion list"):
        publish_recommendations(job(uri, tmp_path, exclusions=listed), ease_bundle, "2")
    assert published(tmp_path) == before


def test_the_merge_skips_each_rows_excluded_new_items() -> None:
    from pipeline.serving.cold_items import ColdItems, merge_cold

    n_items = 4
    cold = ColdItems(pa.array([100, 101, 102], pa.int64()), np.tile(np.float32([[3, 2, 0.5]]), (n_items, 1)), True, 1)
    top, scores = np.tile([1, 2, 3], (3, 1)), np.tile(np.float32([10, 2.5, 1]), (3, 1))
    clicks = sp.csr_matrix(np.float32([[1, 0, 0, 0]] * 3))
    blocked = (np.array([0, 1, 1, 3]), np.array([0, 0, 1]))  # row 0: new item 0; row 2: new items 0 and 1
    t, s, users = merge_cold(top, scores, clicks, cold, n_items, blocked)
    assert t.tolist() == [[1, 2, 5], [1, 4, 2], [1, 2, 3]] and users == 2  # 5 = new item 1, 4 = new item 0
    # a short list (the catalogue ran out) is filled with the new items it did not exclude
    t, s, _ = merge_cold(np.array([[1, 0, 0]]), np.float32([[5, -np.inf, -np.inf]]), None, cold, n_items,
                         (np.array([0, 1]), np.array([1])))
    assert t.tolist() == [[1, 4, 6]] and (s > -np.inf).all()


@pytest.mark.slow
def test_spark_engine_excludes_new_titles_like_the_local_engine(tmp_path: Path, ease_bundle: ModelBundle, events,
                                                                spark) -> None:
    table, uri = events
    for sub in ("plain", "local", "spark"):
        write_items(tmp_path / sub, with_comedy())
    run_infer(job(uri, tmp_path / "plain"), ease_bundle, "1")
    before = published(tmp_path / "plain")
    shown = [u for u in sorted(before) if {NEW, NEW_COMEDY} & set(before[u]["item_ids"])]
    seen = histories(table)
    pairs = [(u, i) for u in shown[::2] for i in (NEW, NEW_COMEDY)]  # their new titles
    pairs += [(u, 1000 + c) for u in shown[1::4] for c in range(N_ITEMS) if c not in seen[u]][:30]  # warm ones
    pairs += [(shown[1], NEW)]  # warm and new for the same user
    listed = write_exclusions(tmp_path / "x.parquet", pairs)
    a = run_infer(job(uri, tmp_path / "local", exclusions=listed), ease_bundle, "1")
    b = run_infer(job(uri, tmp_path / "spark", exclusions=listed, engine="spark"), ease_bundle, "1")
    for key in ("exclusions", "exclusions_unknown_items", "exclusions_users", "exclusions_backfilled_users",
                "cold_items_shown", "cold_users"):
        assert a[key] == b[key], key
    assert a["exclusions_unknown_items"] == 0
    la, lb = published(tmp_path / "local"), published(tmp_path / "spark")
    assert {u: r["item_ids"] for u, r in la.items()} == {u: r["item_ids"] for u, r in lb.items()}
    excluded = set(pairs)
    assert not any((u, i) in excluded for u, r in lb.items() for i in r["item_ids"])
    assert any(NEW in r["item_ids"] for u, r in lb.items() if u not in {p[0] for p in pairs})  # others still get it
