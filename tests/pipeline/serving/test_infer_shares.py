"""The whole-run output check: events whose items the model mostly does not know, or users who would mostly get the
popularity fallback, are refused before the commit (exit 2 at the CLI), so the date's good partition stays what
readers see. The model's baseline of both shares is 0 (its vocabulary is its training items); the ceilings are
configurable (max_unknown_item_share, max_fallback_share)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from infer_support import events_table, run_infer, tiny_bundle, write_events

from pipeline.errors import DataError
from pipeline.io.bundle import ModelBundle
from pipeline.serving.checks import OutputCheckError
from pipeline.serving.job import InferJob
from pipeline.serving.recs import read_recommendations

DAY = dt.date(2024, 5, 3)


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    return tiny_bundle()


def job(events_uri: str, out: Path, **kw: object) -> InferJob:
    base: dict[str, object] = {"date": DAY, "events": events_uri, "out": str(out), "device": "cpu", "progress": False,
                               "top_n": 5, "shard_events": 100}
    return InferJob(**(base | kw))  # type: ignore[arg-type]


def listing(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "recommendations" / f"dt={DAY}").iterdir())


def foreign_items(table: pa.Table, as_string: bool = False) -> pa.Table:
    """The same events with item ids of another catalog (numbers, or "sku-1000" strings against an int64 model)."""
    items = table["item_id"]
    new = (pc.binary_join_element_wise("sku-", pc.cast(items, pa.string()), "") if as_string
           else pc.add(items, 10**6))
    return table.set_column(table.schema.get_field_index("item_id"), "item_id", new)


def few_known(table: pa.Table) -> pa.Table:
    """Users with u % 8 < 5 (62.5%) keep one event, on an unknown item: few unknown events, most users without a
    known item."""
    rows, seen = [], set()
    for r in table.to_pylist():
        if r["user_id"] % 8 < 5:
            if r["user_id"] in seen:
                continue
            seen.add(r["user_id"])
            r["item_id"] = 999_999
        rows.append(r)
    return pa.Table.from_pylist(rows, schema=table.schema)


@pytest.mark.parametrize("as_string", [False, True], ids=["other-numbers", "strings-for-an-int-model"])
def test_events_of_another_catalog_do_not_replace_the_good_partition(tmp_path: Path, bundle: ModelBundle,
                                                                     as_string: bool) -> None:
    table = events_table(n_users=60)
    good = write_events(table, str(tmp_path / "good"))
    bad = write_events(foreign_items(table, as_string), str(tmp_path / "bad"))
    out = tmp_path / "out"
    first = run_infer(job(good, out), bundle, "good")
    with pytest.raises(OutputCheckError, match=r"output check failed: 100\.0% of the \d+ events in the history window "
                                               r"have items the model does not know \(at most 50\.0% allowed.*Fix: the "
                                               r"events' item ids do not match the model's vocabulary"):
        run_infer(job(bad, out), bundle, "bad")
    assert listing(out) == [first["run"]]  # no new run folder, the committed one untouched
    got = read_recommendations(str(out), DAY)
    assert got.num_rows == first["rows"] and set(got["model_version"].to_pylist()) == {"good"}
    assert not any(got["fallback"].to_pylist())


def test_mostly_fallback_users_are_refused_and_the_ceilings_are_configurable(tmp_path: Path, bundle: ModelBundle) -> None:
    table = events_table(n_users=80)
    t = few_known(table)
    events = write_events(t, str(tmp_path / "events"))
    unknown = sum(i == 999_999 for i in t["item_id"].to_pylist()) / t.num_rows
    assert unknown < 0.5  # the unknown-event share alone would pass
    out = tmp_path / "out"
    first = run_infer(job(write_events(table, str(tmp_path / "good")), out), bundle, "good")
    with pytest.raises(OutputCheckError, match=r"of the \d+ active users have no item the model knows and would all "
                                               r"get the popularity fallback \(at most 50\.0% allowed, --max-fallback-share"):
        run_infer(job(events, out), bundle, "bad")
    assert listing(out) == [first["run"]]
    with pytest.raises(OutputCheckError, match="events in the history window have items the model does not know"):
        run_infer(job(events, out, max_unknown_item_share=0.01), bundle, "bad")
    m = run_infer(job(events, out, max_fallback_share=1.0), bundle, "accepted")  # a known influx: raised on purpose
    assert 0.5 < m["fallback_users"] / m["rows"] < 1
    assert set(read_recommendations(str(out), DAY)["model_version"].to_pylist()) == {"accepted"}


def test_cli_refuses_with_exit_2_and_one_line(tmp_path: Path, bundle: ModelBundle,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.cli.main import main

    table = events_table(n_users=60)
    good = write_events(table, str(tmp_path / "good"))
    bad = write_events(foreign_items(table), str(tmp_path / "bad"))
    model = bundle.save(tmp_path / "bundle")
    out = tmp_path / "out"
    base = ["infer", "--date", DAY.isoformat(), "--out", str(out), "--model", str(model), "--device", "cpu",
            "--no-progress", "--top-n", "5"]
    assert main([*base, "--events", good]) == 0
    before = listing(out)
    want = read_recommendations(str(out), DAY).sort_by("user_id")
    capsys.readouterr()
    assert main([*base, "--events", bad]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "100.0% of the" in err and "do not match the model's vocabulary" in err
    assert listing(out) == before
    assert read_recommendations(str(out), DAY).sort_by("user_id").equals(want)
    assert main([*base, "--events", bad, "--max-unknown-item-share", "1", "--max-fallback-share", "1"]) == 0
    assert all(read_recommendations(str(out), DAY)["fallback"].to_pylist())  # asked for: published
    assert main([*base, "--events", bad, "--max-fallback-share", "1.5"]) == 2  # a share is at most 1


def test_spark_engine_refuses_the_same_run(tmp_path: Path, bundle: ModelBundle, spark) -> None:
    table = events_table(n_users=40)
    bad = write_events(foreign_items(table), str(tmp_path / "bad"))
    with pytest.raises(DataError, match=r"100\.0% of the \d+ events in the history window have items the model does not"):
        run_infer(job(bad, tmp_path / "out", engine="spark"), bundle, "bad")
    assert not (tmp_path / "out" / "recommendations" / "_delta_log").exists()  # nothing committed
