"""The published recommendations as an engine-neutral table: delta-rs, Polars and DuckDB read a published date back
exactly as committed (the README's output contract and its DuckDB query, run as written), and never see a staged,
refused or replaced run."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import duckdb
import polars as pl
import pyarrow as pa
import pytest
from deltalake import DeltaTable
from infer_support import events_table, run_infer, tiny_bundle, write_events

from pipeline.io import lake
from pipeline.io.publish import PartitionWriter
from pipeline.serving.job import InferJob
from pipeline.serving.recs import read_recommendations, user_recommendations

README = Path(__file__).resolve().parents[3] / "README.md"
DAYS = (dt.date(2024, 5, 2), dt.date(2024, 5, 3))
COLUMNS = ["dt", "user_id", "item_ids", "scores", "model_version", "fallback"]


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, pa.Table]:
    """Two dates; the later one published twice (a re-run) plus a staged run that never committed."""
    root = tmp_path_factory.mktemp("lake")
    table = events_table(n_users=40, unknown_every=9)
    lone = table.slice(0, 1)  # one user whose only event has an item the model does not know: a fallback row
    lone = lone.set_column(0, "user_id", pa.array([4242], pa.int64())).set_column(1, "item_id", pa.array([999_999]))
    events = write_events(pa.concat_tables([table, lone]), str(root / "events"))
    bundle = tiny_bundle()
    for day, version in ((DAYS[0], "5"), (DAYS[1], "6"), (DAYS[1], "7")):
        run_infer(InferJob(date=day, events=events, out=str(root), device="cpu", top_n=5, progress=False,
                           shard_events=40), bundle, version)
    staged = PartitionWriter(lake.resolve(root / "recommendations" / f"dt={DAYS[1]}"))
    staged.write_part(read_recommendations(str(root), DAYS[1]).replace_schema_metadata(None))  # a crashed re-run
    ours = pa.concat_tables(read_recommendations(str(root), d).replace_schema_metadata(None).append_column(
        "dt", pa.array([d] * read_recommendations(str(root), d).num_rows, pa.date32())) for d in DAYS)
    return str(root / "recommendations"), ours.select(COLUMNS).sort_by([("dt", "ascending"), ("user_id", "ascending")])


def _sorted(table: pa.Table) -> pa.Table:
    return table.select(COLUMNS).sort_by([("dt", "ascending"), ("user_id", "ascending")])


def test_delta_rs_reads_exactly_the_committed_rows(published: tuple[str, pa.Table]) -> None:
    uri, ours = published
    table = DeltaTable(uri)
    got = _sorted(pa.table(table.to_pyarrow_table()))
    assert got.to_pylist() == ours.to_pylist()  # one run per date: no replaced, no staged rows
    assert set(got["model_version"].to_pylist()) == {"5", "7"}
    assert table.metadata().partition_columns == ["dt"]
    schema = pa.schema(table.schema().to_arrow())
    assert schema.field("dt").type == pa.date32() and schema.field("user_id").type == pa.int64()
    assert schema.field("scores").type.value_type == pa.float32() and schema.field("fallback").type == pa.bool_()
    assert [f.name for f in schema] == ["user_id", "item_ids", "scores", "model_version", "fallback", "dt"]


def test_polars_reads_exactly_the_committed_rows(published: tuple[str, pa.Table]) -> None:
    uri, ours = published
    frame = pl.read_delta(uri)
    assert frame.schema["dt"] == pl.Date and frame.schema["scores"] == pl.List(pl.Float32)
    assert _sorted(frame.to_arrow()).cast(ours.schema).to_pylist() == ours.to_pylist()
    one = pl.scan_delta(uri).filter(pl.col("dt") == DAYS[1]).collect()
    assert one.height == ours.filter(pa.compute.equal(ours["dt"], pa.scalar(DAYS[1]))).num_rows
    assert one["dt"].max() == pl.scan_delta(uri).select(pl.col("dt").max()).collect().item() == DAYS[1]


def _readme_query() -> str:
    found = re.search(r"<!-- duckdb-user-query -->\n```sql\n(.*?)```\n<!-- /duckdb-user-query -->", README.read_text(),
                      re.S)
    assert found, "the README's DuckDB query (between its markers) is missing"
    return found.group(1)


def test_the_readme_duckdb_query_returns_a_users_list(published: tuple[str, pa.Table]) -> None:
    uri, ours = published
    con = duckdb.connect()
    con.register("recommendations", DeltaTable(uri).to_pyarrow_dataset())  # the README's Python route
    latest = con.execute("SELECT max(dt) FROM recommendations").fetchone()
    assert latest is not None and latest[0] == DAYS[1]  # the latest complete date
    assert con.execute("SELECT count(*) FROM recommendations").fetchone() == (ours.num_rows,)
    fallback_user = next(r["user_id"] for r in ours.to_pylist() if r["fallback"] and r["dt"] == DAYS[1])
    model_user = next(r["user_id"] for r in ours.to_pylist() if not r["fallback"] and r["dt"] == DAYS[1])
    for user in (model_user, fallback_user):
        con.execute("SET VARIABLE day = (SELECT max(dt) FROM recommendations)")
        con.execute(f"SET VARIABLE user_id = {int(user)}")
        rows = con.execute(_readme_query()).fetchall()
        want = user_recommendations(str(Path(uri).parent), DAYS[1], user)
        assert [(r[4], r[5], pytest.approx(r[6])) for r in rows] == [
            (rank, item, score) for rank, (item, score) in enumerate(want["items"], 1)]
        assert {(r[0], r[1], r[2], r[3]) for r in rows} == {(DAYS[1], user, "7", want["fallback"])}
        scores = [r[6] for r in rows]
        assert scores == sorted(scores, reverse=True)
    # fallback rows carry popularity shares; model rows the model's own scale
    assert all(0 <= r[6] <= 1 for r in rows)


def test_duckdb_delta_extension_reads_the_table_when_installed(published: tuple[str, pa.Table]) -> None:
    """DuckDB's own Delta reader (`delta_scan`), as the README's CLI route. Its extension is downloaded by DuckDB
    from its own extension site, which this machine cannot reach; where it is installed, this runs."""
    uri, ours = published
    con = duckdb.connect()
    try:
        con.execute("SET autoinstall_known_extensions = false")  # no download attempt
        con.execute("LOAD delta")
    except duckdb.Error as e:
        pytest.skip(f"DuckDB's delta extension is not installed here ({str(e).splitlines()[0][:120]})")
    con.execute(f"CREATE VIEW recommendations AS SELECT * FROM delta_scan('{uri}')")
    got = _sorted(con.execute("SELECT * FROM recommendations").to_arrow_table())
    assert got.cast(ours.schema).to_pylist() == ours.to_pylist()
