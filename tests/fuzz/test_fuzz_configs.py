"""Configurations from outside: random YAML (valid or not, tags, aliases, non-mappings, bad types, unknown keys)
into `recsys train --config` and the gate config loader, and random option values into `recsys infer`. Each ends
in a job, or in exit 2 with one line per problem (`field: problem. Fix: fix` for a validation error); never a
traceback, never a pydantic documentation URL, and a refused `recsys infer` changes nothing in the lake."""

from __future__ import annotations

import datetime as dt
import itertools
import shutil
from pathlib import Path

import pytest
import yaml
from fuzz_support import assert_one_error_line, assert_only_date_changed, assert_valid_partition, fingerprint, run_cli, scaled
from hypothesis import event, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from pipeline.cli.main import validation_lines
from pipeline.errors import DataError

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=6)


def mapping(known: list[str], nested: dict[str, list[str]]) -> st.SearchStrategy[dict]:
    keys = st.one_of(st.sampled_from(known), st.text(max_size=8), st.integers(-3, 3))
    sub = {k: st.dictionaries(st.one_of(st.sampled_from(v), st.text(max_size=5)), VALUES, max_size=3)
           for k, v in nested.items()}
    nested_items = st.one_of(*(st.tuples(st.just(k), s) for k, s in sub.items())) if sub else st.nothing()
    return st.lists(st.one_of(st.tuples(keys, VALUES), nested_items), max_size=5).map(dict)


NASTY_YAML = [
    "!!python/object/apply:os.system ['echo pwned']\n", "epochs: !!python/name:os.system\n", "a: [\n", "{epochs: 1\n",
    "- 1\n- 2\n", "epochs: 1\nepochs: 2\n", "? [a, b]\n: 1\n", "epochs: .nan\n", "epochs: 1e400\n", "\tepochs: 1\n",
    "%YAML 9.9\n---\nepochs: 1\n", "a: &x [*x]\n", "<<: *nowhere\n", "epochs: !custom 3\n", "---\n...\n---\na: 1\n",
    "epochs: 0x10\n", "vae: {hidden_dims: [1, -1]}\n", "vae: 3\n", "42\n", "null\n", "'just a string'\n", "[]\n",
]


def yaml_texts(known: list[str], nested: dict[str, list[str]]) -> st.SearchStrategy[str]:
    return st.one_of(mapping(known, nested).map(lambda d: yaml.safe_dump(d, allow_unicode=True)),
                     st.sampled_from(NASTY_YAML), st.text(max_size=40))


_counter = itertools.count()


def _write(root: Path, text: str | bytes) -> Path:
    path = root / f"config-{next(_counter)}.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text)
    return path


def _train_keys() -> tuple[list[str], dict[str, list[str]]]:
    from pipeline.training.train_job import TrainJob

    fields = TrainJob.model_fields
    nested = {k: sorted(fields[k].annotation.model_fields) for k in ("vae", "pia", "ease")}  # type: ignore[union-attr]
    return sorted(fields), nested


TRAIN_KEYS, TRAIN_NESTED = _train_keys()


@settings(max_examples=scaled(60))
@given(text=yaml_texts(TRAIN_KEYS, TRAIN_NESTED))
@example(text=NASTY_YAML[0])
@example(text="? [a, b]\n: 1\n")
@example(text="1: 2\n")
@example(text="\udcff: 1\n")
def test_train_config_is_a_job_or_lines_with_fixes(tmp_path_factory: pytest.TempPathFactory,
                                                    capsys: pytest.CaptureFixture[str], text: str) -> None:
    root = tmp_path_factory.getbasetemp()
    o = run_cli(["train", "--snapshot", str(root / "no-snapshot"), "--config", str(_write(root, text)),
                 "--device", "cpu"], capsys)
    # a valid config gets as far as the snapshot, which does not exist: exit 2 either way
    lines = o.err.splitlines()
    assert o.rc == 2 and lines and "Traceback" not in o.err and "errors.pydantic.dev" not in o.err, o.err
    assert all(line.startswith("recsys train: error: ") and ". Fix: " in line for line in lines), o.err
    assert not (root / "no-snapshot").exists()


GATE_KEYS = ["metrics", "primary", "floors", "champion_tolerance", "popularity_margin", "ease_margin", "coverage_floor",
             "top_n", "sanity_users", "allow_missing_baselines"]


@settings(max_examples=scaled(60))
@given(text=yaml_texts(GATE_KEYS, {}))
@example(text="floors: {ndcg@100: abc}\n")
@example(text="metrics: [no_such_metric]\nprimary: no_such_metric\n")
@example(text="1: 2\n")
def test_gate_config_is_a_config_or_lines_with_fixes(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    """The loader `recsys gate --config` calls first, and the lines the CLI prints for what it raises."""
    from pipeline.training.gates import GateConfig, load_gate_config

    try:
        cfg = load_gate_config(_write(tmp_path_factory.getbasetemp(), text))
    except DataError as e:
        assert "\n" not in str(e) and ". Fix: " in str(e)
        return
    except ValidationError as e:
        lines = validation_lines(e, {"--config"})
        assert lines and all(". Fix: " in line and "\n" not in line and "pydantic.dev" not in line for line in lines)
        return
    assert isinstance(cfg, GateConfig)


# -- recsys infer with random option values ------------------------------------------------------------------

DAY = "2024-05-03"


@pytest.fixture(scope="module")
def infer_lake(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny model bundle, small events, and a lake with committed partitions for DAY and the day before."""
    from infer_support import events_table, tiny_bundle, write_events

    from pipeline.cli.main import main

    root = tmp_path_factory.mktemp("infer-options")
    model = tiny_bundle().save(root / "bundle")
    events = write_events(events_table(n_users=12), str(root / "events"))
    lake = root / "lake"
    for day in ("2024-05-02", DAY):
        assert main(["infer", "--date", day, "--events", events, "--out", str(lake), "--model", str(model),
                     "--device", "cpu", "--top-n", "5", "--no-progress"]) == 0
    return {"root": root, "model": model, "events": Path(events), "lake": lake}


DATES = st.one_of(st.sampled_from([DAY, "2024-05-01", "2024-05-02", "2024-06-30"]), st.dates().map(dt.date.isoformat),
                  st.sampled_from([DAY, "9999-12-31", "0001-01-01"]), st.text(max_size=12))
# mostly unset or plausible, so that about half the runs publish; sometimes anything
OPTIONAL_INT = st.one_of(st.none(), st.none(), st.integers(min_value=1, max_value=40),
                         st.integers(min_value=-(2**64), max_value=2**64))


@settings(max_examples=scaled(30))
@given(date=DATES, top_n=st.one_of(st.none(), st.integers(1, 50), st.integers(-2, 12_000)), history_days=OPTIONAL_INT,
       budget=st.one_of(st.none(), st.integers(16, 4096), st.integers(-1, 10**6)), shard_events=OPTIONAL_INT,
       parallel=OPTIONAL_INT, min_weight=st.one_of(st.none(), st.none(), st.floats(allow_nan=True, allow_infinity=True)),
       precision=st.sampled_from(["auto", "fp32", "bf16"]))
@example(date="9999-12-31", top_n=None, history_days=None, budget=None, shard_events=None, parallel=None,
         min_weight=None, precision="auto")
@example(date="0001-01-01", top_n=None, history_days=2, budget=None, shard_events=None, parallel=None,
         min_weight=None, precision="auto")
@example(date=DAY, top_n=None, history_days=10**9, budget=None, shard_events=None, parallel=None,
         min_weight=None, precision="auto")
def test_infer_options_publish_or_refuse_in_one_line(infer_lake: dict[str, Path], capsys: pytest.CaptureFixture[str],
                                                     date: str, top_n: int | None, history_days: int | None,
                                                     budget: int | None, shard_events: int | None,
                                                     parallel: int | None, min_weight: float | None,
                                                     precision: str) -> None:
    lake = infer_lake["root"] / f"lake-{next(_counter)}"
    shutil.copytree(infer_lake["lake"], lake)
    before = fingerprint(lake)
    argv = ["infer", f"--date={date}", "--events", str(infer_lake["events"]), "--out", str(lake),
            "--model", str(infer_lake["model"]), "--device", "cpu", "--no-progress", f"--precision={precision}"]
    for flag, value in (("--top-n", top_n), ("--history-days", history_days), ("--memory-budget-mb", budget),
                        ("--shard-events", shard_events), ("--parallel-shards", parallel), ("--min-weight", min_weight)):
        if value is not None:
            argv.append(f"{flag}={value}")
    o = run_cli(argv, capsys)
    event(f"exit {o.rc}")
    try:
        if o.rc == 0:
            day = dt.date.fromisoformat(date).isoformat()
            assert_valid_partition(lake, day, top_n or 100)
            assert_only_date_changed(before, fingerprint(lake), day)
        elif o.err.count("\n") > 1 and o.err.lstrip().startswith("recsys infer: error: ") and "Traceback" not in o.err:
            # a validation error: one line per field
            assert all(line.startswith("recsys infer: error: ") and ". Fix: " in line for line in o.err.splitlines())
            assert fingerprint(lake) == before
        else:
            assert_one_error_line(o, "infer")
            assert fingerprint(lake) == before  # refused: nothing published, nothing lost
    finally:
        shutil.rmtree(lake, ignore_errors=True)
