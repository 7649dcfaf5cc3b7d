"""README.md's settings tables, the settings classes and the source agree: every Settings / AwsProfile field and every
deliberate non-setting (OTHER_VARIABLES) is in the README with its default, the README lists nothing else, and no
module mentions (so reads) a RECSYS_* variable that is not documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.orchestration.settings import OTHER_VARIABLES, Settings, documented_variables

REPO = Path(__file__).resolve().parents[3]
README = REPO / "README.md"
# where the project's code lives (tests are excluded: they may invent variables to prove a point)
SOURCES = ("pipeline", "dags", "model", "bench", "tools", "docker", "infra", "Makefile", "configs")
_ROW = re.compile(r"^\| `((?:RECSYS|MLFLOW)_[A-Z0-9_]+)` \| `([^`]*)` \| (.*) \|$")
# a RECSYS_ name, not part of a longer word (`_RECSYS_EVENTS.json` is a marker file, not a variable)
_NAME = re.compile(r"(?<![A-Za-z0-9_])RECSYS_[A-Z0-9_]*")


def readme_rows(text: str) -> dict[str, str]:
    rows: dict[str, str] = {}
    for line in text.splitlines():
        if m := _ROW.match(line):
            assert m.group(1) not in rows, f"{m.group(1)} is listed twice in README.md"
            rows[m.group(1)] = m.group(2)
    return rows


def undocumented(paths: list[Path], documented: set[str]) -> dict[str, str]:
    """RECSYS_* names in these files that the README does not list: {name: first file}. A name ending in `_` is a
    prefix a module completes at run time (f"RECSYS_SPARK_{name}"): some documented variable must start with it."""
    found: dict[str, str] = {}
    for path in paths:
        for name in _NAME.findall(path.read_text(errors="replace")):
            ok = any(d.startswith(name) for d in documented) if name.endswith("_") else name in documented
            if not ok:
                found.setdefault(name, str(path))
    return found


def source_files() -> list[Path]:
    files: list[Path] = []
    for entry in SOURCES:
        p = REPO / entry
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files += [f for f in sorted(p.rglob("*")) if f.is_file() and f.suffix in (".py", ".sh", ".yaml", ".yml", ".toml",
                                                                                       "", ".Dockerfile", ".cfg")
                      and "__pycache__" not in f.parts]
    return files


def test_the_readme_lists_every_setting_with_its_default_and_nothing_else() -> None:
    expected = {var: default for rows in documented_variables().values() for var, default, _ in rows}
    actual = readme_rows(README.read_text())
    missing, extra = set(expected) - set(actual), set(actual) - set(expected)
    fix = "paste the tables of `python -m pipeline.orchestration.settings` into README.md's Settings section"
    assert not missing, f"not in README.md: {sorted(missing)}; {fix}"
    assert not extra, f"in README.md but no setting: {sorted(extra)}; {fix}"
    wrong = {v: (actual[v], expected[v]) for v in expected if actual[v] != expected[v]}
    assert not wrong, f"README default vs the code's: {wrong}; {fix}"


def test_settings_fields_are_exactly_the_settings_section() -> None:
    sections = documented_variables()
    assert [v for v, _, _ in sections["Settings"]] == list(Settings.env_names().values())
    assert [v for v, _, _ in sections["other"]] == list(OTHER_VARIABLES)
    assert not set(OTHER_VARIABLES) & set(Settings.env_names().values())  # a variable is a setting or not, not both
    assert {"RECSYS_HOOK_POINT", "RECSYS_HOOK_FILE", "RECSYS_HOOK_SLEEP", "RECSYS_DATA_DIR"} <= set(OTHER_VARIABLES)
    assert "RECSYS_HOME" in Settings.env_names().values() and "MLFLOW_TRACKING_URI" in Settings.env_names().values()


def test_no_module_reads_an_undocumented_variable() -> None:
    files = source_files()
    assert len(files) > 50 and any(f.name == "lake.py" for f in files)  # the walk reaches the code
    found = undocumented(files, set(readme_rows(README.read_text())))
    assert not found, f"RECSYS_* variables read but not in README.md's settings tables: {found}"


def test_the_source_check_finds_a_new_variable(tmp_path: Path) -> None:
    module = tmp_path / "new.py"
    module.write_text('import os\nLIMIT = os.environ.get("RECSYS_NEW_LIMIT", "3")\nPREFIX = f"RECSYS_SPARK_{1}"\n'
                      'MARKER = "_RECSYS_EVENTS.json"\nOTHER = "RECSYS_NOPE_"\n')
    assert undocumented([module], {"RECSYS_SPARK_MASTER"}) == {"RECSYS_NEW_LIMIT": str(module), "RECSYS_NOPE_": str(module)}


@pytest.mark.parametrize("var", ["RECSYS_LEDGER", "RECSYS_SPARK_EXECUTOR_MEMORY"])
def test_settings_read_every_documented_field_from_the_environment(monkeypatch: pytest.MonkeyPatch, var: str) -> None:
    value = "s3://bucket/ledger.jsonl" if var == "RECSYS_LEDGER" else "8g"
    monkeypatch.setenv(var, value)
    s = Settings.from_env()
    assert (s.ledger if var == "RECSYS_LEDGER" else s.spark().executor_memory) == value


def test_tracking_uri_is_read_from_mlflow_tracking_uri_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("TRACKING_URI", "http://elsewhere:5000")  # a bare field name is not a variable of ours
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))
    assert Settings.from_env().tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert Settings.from_env().tracking_uri == "http://mlflow:5000"
    assert Settings(tracking_uri="sqlite:///x.db").tracking_uri == "sqlite:///x.db"  # the keyword still works
