"""One id rule (pipeline.io.ids) from the events to the readers: string user ids with unicode, '/', spaces are
inferred, published and read back through `recsys recs --user` and the Python readers (the readers used to refuse
them); an id the rule refuses (a control character) is refused by inference in both engines, before anything is
published, so nothing is published that cannot be looked up."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from infer_support import events_table, run_infer, tiny_bundle

from pipeline.errors import DataError
from pipeline.io.bundle import ModelBundle
from pipeline.serving.job import InferJob
from pipeline.serving.recs import read_recommendations, user_recommendations

DAY = "2024-05-03"
ODD = ["ünï/1", "a b", "用户/2", "../etc", "x" * 256, " lead", "007", "7", "😀"]


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    return tiny_bundle()


def events_with(tmp_path: Path, names: list[str]) -> str:
    """The shared test events (string users u0, u1, ...), the first users renamed to `names`."""
    t = events_table(n_users=40, string_users=True)
    rename = {f"u{i}": n for i, n in enumerate(names)}
    users = pa.array([rename.get(u, u) for u in t["user_id"].to_pylist()], pa.string())
    path = tmp_path / "events.parquet"
    pq.write_table(t.drop_columns(["dt"]).set_column(0, "user_id", users), path)
    return str(path)


def job(events: str, out: Path, engine: str = "local") -> InferJob:
    return InferJob(date=dt.date.fromisoformat(DAY), events=events, out=str(out), device="cpu", top_n=5,  # type: ignore[arg-type]
                    progress=False, shard_events=40, engine=engine)


def test_published_unicode_ids_are_read_back_by_the_cli_and_the_readers(
        tmp_path: Path, bundle: ModelBundle, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.cli.main import main

    events = events_with(tmp_path, ODD)
    model = bundle.save(tmp_path / "bundle")
    out = tmp_path / "out"
    assert main(["infer", "--date", DAY, "--events", events, "--out", str(out), "--model", str(model),
                 "--device", "cpu", "--no-progress", "--top-n", "5", "--shard-events", "40"]) == 0
    published = set(read_recommendations(str(out), DAY)["user_id"].to_pylist())
    assert set(ODD) <= published
    got = read_recommendations(str(out), "latest", user_ids=ODD)
    assert sorted(got["user_id"].to_pylist()) == sorted(ODD)
    capsys.readouterr()
    for u in ODD:
        r = user_recommendations(str(out), DAY, u)
        assert r["user_id"] == u and len(r["items"]) == 5
        assert main(["recs", "--date", DAY, "--user", u, "--out", str(out), "--json"]) == 0
        printed = json.loads(capsys.readouterr().out)
        assert printed["user_id"] == u and [i for i, _ in printed["items"]] == [i for i, _ in r["items"]]
    assert main(["recs", "--date", DAY, "--user", "ünï/1", "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith("user ünï/1  date 2024-05-03")
    assert main(["recs", "--date", DAY, "--user", "ünï/1\x07", "--out", str(out)]) == 2  # the rule's refusal
    assert "invalid user id" in capsys.readouterr().err


@pytest.mark.parametrize(("engine", "bad"), [("local", "tab\there"), ("local", "x" * 257), ("local", "nul\x00"),
                                             ("local", "c1\x85"), ("spark", "nul\x00"), ("spark", "x" * 257)],
                         ids=["local-tab", "local-long", "local-nul", "local-c1", "spark-nul", "spark-long"])
def test_ids_the_rule_refuses_are_refused_by_inference(tmp_path: Path, bundle: ModelBundle, engine: str, bad: str,
                                                       request: pytest.FixtureRequest) -> None:
    if engine == "spark":
        request.getfixturevalue("spark")
    events = events_with(tmp_path, ["fine", bad])
    with pytest.raises(DataError, match=r"events at .* hold the user id .*, which could not be looked up once "
                                        r"published: it (holds the control character|is 257 characters).*Fix: fix or "
                                        r"drop those events"):
        run_infer(job(events, tmp_path / "out", engine), bundle, "1")
    assert not (tmp_path / "out" / "recommendations").exists()
