"""Small event tables from outside through `recsys infer` (local engine, a tiny model): random column types and
values (ids as ints of any width, unicode or empty strings, floats, booleans; event_ts as timestamps of any unit
or zone, strings, integer epochs, dates; nulls anywhere; weights of any type), flat or in dt= folders.

The invariant: exit 0 with a valid partition for the date (every list well formed, not every user a popularity
fallback, no user whose only events are after the date, every published user readable again with `recsys recs`,
other dates untouched), or exit 2 with exactly one stderr line and every file of the lake unchanged. Never a
traceback. The same attack runs against a lake and events on S3 (moto on 127.0.0.1)."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fuzz_support import assert_one_error_line, assert_only_date_changed, assert_valid_partition, fingerprint, run_cli, scaled
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

DAY = dt.date(2024, 5, 3)
TOP_N = 5
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
KNOWN_ITEMS = list(range(1000, 1040))  # the tiny bundle's item ids (infer_support.item_ids)

USER_VALUES = {
    "int64": st.one_of(st.integers(0, 6), st.sampled_from([INT64_MIN, INT64_MAX, -1])),
    "int32": st.integers(-3, 6),
    "string": st.one_of(st.sampled_from(["u0", "u1", "ü/ß", "a b", "😀", "007", "7", "-x", " ", "\u200b", "é"]),
                        st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]), min_size=1,
                                max_size=4),
                        st.sampled_from(["", "x\x00y", "a" * 257, "\x85", "\t"]),  # against the id rule
                        st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=4)),
    "float64": st.floats(allow_nan=True, allow_infinity=True),
    "bool": st.booleans(),
}
ITEM_VALUES = {
    "known": st.sampled_from(KNOWN_ITEMS),
    "int64": st.one_of(st.sampled_from(KNOWN_ITEMS), st.integers(INT64_MIN, INT64_MAX)),
    "string": st.one_of(st.sampled_from(["i1", "1000", ""]), st.text(max_size=3)),
    "float64": st.floats(),
}
ARROW = {"int64": pa.int64(), "int32": pa.int32(), "string": pa.string(), "float64": pa.float64(), "bool": pa.bool_(),
         "known": pa.int64()}
TS_KINDS = ["absent", "timestamp[us]", "timestamp[us, UTC]", "timestamp[ns]", "timestamp[s]", "string", "int64", "date32"]
WEIGHT_KINDS = ["absent", "float64", "int64", "string"]


@st.composite
def events(draw: st.DrawFn) -> dict[str, Any]:
    """Columns as Python lists plus their kinds; rows carry their day (-1, 0, +1 from DAY) and hour."""
    # most tables are well typed (then the values are what varies), so that both outcomes are exercised
    clean = draw(st.sampled_from([True, True, True, False]))
    user_kind = draw(st.sampled_from(["int64", "string"] if clean else ["int32", "float64", "bool", "string", "int64"]))
    item_kind = draw(st.sampled_from(["known"] if clean else ["int64", "string", "float64", "known"]))
    layout = draw(st.sampled_from(["flat", "dt"]))
    good_ts = [k for k in TS_KINDS if k == "absent" or k.startswith("timestamp")]
    ts_kinds = draw(st.lists(st.sampled_from(good_ts if clean else TS_KINDS), min_size=3, max_size=3))
    if draw(st.integers(0, 3)):  # mostly one type in every file
        ts_kinds = [ts_kinds[0]] * 3
    weight_kind = draw(st.sampled_from(WEIGHT_KINDS[:2] if clean else WEIGHT_KINDS))
    nullable = st.booleans() if draw(st.sampled_from([False, False, False, True])) else st.just(False)
    rows = draw(st.lists(st.fixed_dictionaries({
        "user": USER_VALUES[user_kind], "item": ITEM_VALUES[item_kind], "day": st.sampled_from([-1, 0, 0, 1]),
        "hour": st.integers(0, 23), "null_user": nullable, "null_item": nullable, "null_ts": nullable,
        "junk_ts": st.integers(0, 9), "weight": st.floats(0, 5)}), min_size=2, max_size=10))
    return {"user_kind": user_kind, "item_kind": item_kind, "layout": layout, "ts_kinds": ts_kinds,
            "weight_kind": weight_kind, "rows": rows}


def _ts_value(kind: str, row: dict[str, Any]) -> Any:
    moment = dt.datetime.combine(DAY + dt.timedelta(days=row["day"]), dt.time(row["hour"], 30))
    if row["null_ts"]:
        return None
    if kind == "string":
        return moment.isoformat(" ") if row["junk_ts"] else "yesterday"
    if kind == "int64":
        return int(moment.replace(tzinfo=dt.UTC).timestamp())
    if kind == "date32":
        return moment.date()
    return moment.replace(tzinfo=dt.UTC) if "UTC" in kind else moment


def _ts_type(kind: str) -> pa.DataType:
    return {"timestamp[us]": pa.timestamp("us"), "timestamp[us, UTC]": pa.timestamp("us", "UTC"),
            "timestamp[ns]": pa.timestamp("ns"), "timestamp[s]": pa.timestamp("s"), "string": pa.string(),
            "int64": pa.int64(), "date32": pa.date32()}[kind]


def _table(spec: dict[str, Any], rows: list[dict[str, Any]], ts_kind: str) -> pa.Table:
    cols: dict[str, pa.Array] = {
        "user_id": pa.array([None if r["null_user"] else r["user"] for r in rows], ARROW[spec["user_kind"]]),
        "item_id": pa.array([None if r["null_item"] else r["item"] for r in rows], ARROW[spec["item_kind"]]),
    }
    if ts_kind != "absent":
        cols["event_ts"] = pa.array([_ts_value(ts_kind, r) for r in rows], _ts_type(ts_kind))
    w = spec["weight_kind"]
    if w != "absent":
        values = [r["weight"] for r in rows]
        cols["weight"] = pa.array([int(v) for v in values] if w == "int64" else
                                  [str(v) for v in values] if w == "string" else values, ARROW[w])
    return pa.table(cols)


def write(spec: dict[str, Any], uri: str) -> str:
    """The table(s) of `spec` under `uri` (a local folder or s3://): one file, or one per dt= folder."""
    from pipeline.io import lake as lake_io

    root = lake_io.resolve(uri)

    def put(loc: lake_io.Location, table: pa.Table) -> None:
        loc.mkdir_parent()
        pq.write_table(table, loc.path, filesystem=loc.fs)

    if spec["layout"] == "flat":
        put(root.join("events.parquet"), _table(spec, spec["rows"], spec["ts_kinds"][0]))
        return root.join("events.parquet").uri
    for offset, kind in zip((-1, 0, 1), spec["ts_kinds"], strict=True):
        rows = [r for r in spec["rows"] if r["day"] == offset]
        if rows:
            put(root.join(f"dt={(DAY + dt.timedelta(days=offset)).isoformat()}", "part-0.parquet"), _table(spec, rows, kind))
    return root.uri


def future_only_users(spec: dict[str, Any]) -> set[Any]:
    """Users all of whose events are known to be after DAY (their dt= folder, or a readable event_ts): no
    partition for DAY may hold them."""
    known_future: dict[Any, bool] = {}
    for r in spec["rows"]:
        if r["null_user"]:
            continue
        kind = spec["ts_kinds"][0] if spec["layout"] == "flat" else None
        timed = spec["layout"] == "dt" or (kind not in ("absent", "date32") and not r["null_ts"] and
                                          (kind != "string" or r["junk_ts"]))
        future = timed and r["day"] == 1
        known_future[r["user"]] = known_future.get(r["user"], True) and future
    return {u for u, only_future in known_future.items() if only_future}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny model bundle and a lake with good committed partitions for DAY and the day before."""
    from infer_support import events_table, tiny_bundle, write_events

    from pipeline.cli.main import main

    root = tmp_path_factory.mktemp("fuzz-events")
    model = tiny_bundle().save(root / "bundle")
    good = write_events(events_table(n_users=12), str(root / "good-events"))
    for day in (DAY - dt.timedelta(days=1), DAY):
        assert main(["infer", "--date", day.isoformat(), "--events", good, "--out", str(root / "lake"),
                     "--model", str(model), "--device", "cpu", "--top-n", str(TOP_N), "--no-progress"]) == 0
    return {"root": root, "model": model, "lake": root / "lake"}


_counter = itertools.count()
_ROW = {"user": "u1", "item": 1001, "day": 0, "hour": 3, "null_user": False, "null_item": False, "null_ts": False,
        "junk_ts": 1, "weight": 1.0}
_FUTURE = {**_ROW, "user": "later", "day": 1}


def _spec(**kw: Any) -> dict[str, Any]:
    return {"user_kind": "string", "item_kind": "known", "layout": "flat", "ts_kinds": ["timestamp[us]"] * 3,
            "weight_kind": "absent", "rows": [_ROW, _FUTURE], **kw}


def check_infer(spec: dict[str, Any], events_uri: str, lake: str, model: Path, snapshot: Any,
                capsys: pytest.CaptureFixture[str]) -> None:
    """Run `recsys infer` on the events and assert the invariant (module doc); `snapshot()` fingerprints the lake."""
    before = snapshot()
    o = run_cli(["infer", "--date", DAY.isoformat(), "--events", events_uri, "--out", lake, "--model", str(model),
                 "--device", "cpu", "--top-n", str(TOP_N), "--no-progress"], capsys)
    event(f"exit {o.rc}: " + (o.err.split("error: ", 1)[-1][:50] if o.rc else "published"))
    if o.rc != 0:
        assert_one_error_line(o, "infer")
        assert snapshot() == before, "a refused run changed the lake"
        return
    users = assert_valid_partition(lake, DAY.isoformat(), TOP_N)
    from pipeline.serving.recs import read_recommendations

    fallback = read_recommendations(lake, DAY.isoformat(), columns=["fallback"])["fallback"].to_pylist()
    assert not all(fallback), "a partition of popularity fallbacks only replaced the good one"
    leaked = future_only_users(spec) & set(users)
    assert not leaked, f"users with only events after {DAY} were published: {sorted(map(repr, leaked))}"
    assert_only_date_changed(before, snapshot(), DAY.isoformat())
    for uid in users[:3]:  # what was published can be looked up again
        r = run_cli(["recs", "--date", DAY.isoformat(), f"--user={uid}", "--out", lake, "--json"], capsys)
        assert r.rc == 0, f"published user {uid!r} cannot be read back: {r.err}"
        assert json.loads(r.out)["user_id"] == uid


EXAMPLES = [
    _spec(ts_kinds=["string"] * 3),  # event_ts as text: the future user must not be published
    _spec(ts_kinds=["int64"] * 3),  # event_ts as epoch seconds
    _spec(rows=[{**_ROW, "user": "ü/ß 😀"}, {**_ROW, "user": "a b"}]),  # published ids must read back
    _spec(item_kind="string", rows=[{**_ROW, "item": "zz"}]),  # no known item at all
    _spec(layout="dt", ts_kinds=["timestamp[us]", "int64", "timestamp[us]"]),  # types differ per file
    _spec(rows=[{**_ROW, "user": "x\x00y"}]),
    _spec(rows=[]),
]


def with_examples(test: Any) -> Any:
    for spec in reversed(EXAMPLES):
        test = example(spec=spec)(test)
    return test


@settings(max_examples=scaled(40))
@given(spec=events())
@with_examples
def test_infer_publishes_a_valid_partition_or_refuses_in_one_line(base: dict[str, Path],
                                                                   capsys: pytest.CaptureFixture[str],
                                                                   spec: dict[str, Any]) -> None:
    work = base["root"] / f"case-{next(_counter)}"
    lake = work / "lake"
    shutil.copytree(base["lake"], lake)
    try:
        check_infer(spec, write(spec, str(work / "events")), str(lake), base["model"], lambda: fingerprint(lake), capsys)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- the same attack on S3 (moto on 127.0.0.1): events and lake in a bucket ------------------------------------

def s3_fingerprint(uri: str) -> dict[str, str]:
    """sha256 of every object under an s3:// prefix (relative key → digest)."""
    import hashlib

    import boto3

    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    client = boto3.client("s3")
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for obj in page.get("Contents", []):
            if obj["Key"].endswith("/") and obj["Size"] == 0:
                continue  # a folder marker: pyarrow leaves one for the parent when it deletes a refused run's folder
            body = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            out[obj["Key"][len(prefix) + 1:]] = hashlib.sha256(body).hexdigest()
    return out


@pytest.fixture(scope="module")
def s3_base(base: dict[str, Path], moto_server: str) -> Iterator[str]:
    """A bucket holding the base lake's committed partitions (copied from the local one)."""
    import uuid

    import boto3

    bucket = f"fuzz-{uuid.uuid4().hex[:10]}"
    client = boto3.client("s3")
    client.create_bucket(Bucket=bucket)
    for path in sorted(p for p in base["lake"].rglob("*") if p.is_file()):
        client.put_object(Bucket=bucket, Key=f"base/{path.relative_to(base['lake'])}", Body=path.read_bytes())
    yield f"s3://{bucket}"
    # the moto server is shared by the session: leave no bucket behind (tests/infra lists every bucket)
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=bucket, Key=obj["Key"])
    client.delete_bucket(Bucket=bucket)


@settings(max_examples=scaled(6))
@given(spec=events())
@example(spec=EXAMPLES[0])
@example(spec=EXAMPLES[2])
def test_infer_on_s3_publishes_a_valid_partition_or_refuses_in_one_line(base: dict[str, Path], s3_base: str,
                                                                         capsys: pytest.CaptureFixture[str],
                                                                         spec: dict[str, Any]) -> None:
    import boto3

    case = f"case-{next(_counter)}"
    bucket = s3_base.removeprefix("s3://")
    client = boto3.client("s3")
    for key in s3_fingerprint(f"{s3_base}/base"):
        client.copy_object(Bucket=bucket, Key=f"{case}/lake/{key}", CopySource={"Bucket": bucket, "Key": f"base/{key}"})
    lake = f"{s3_base}/{case}/lake"
    check_infer(spec, write(spec, f"{s3_base}/{case}/events"), lake, base["model"], lambda: s3_fingerprint(lake), capsys)
