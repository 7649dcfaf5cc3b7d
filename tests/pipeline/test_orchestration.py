"""pipeline.orchestration: settings from the environment, date validation, and how task results are read."""

from __future__ import annotations

from pathlib import Path

import pytest

import pipeline.orchestration as orch
from pipeline.errors import DataError


def test_settings_default_under_recsys_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("RECSYS_EVENTS_URI", "RECSYS_LAKE_URI", "RECSYS_RECS_URI", "MLFLOW_TRACKING_URI", "RECSYS_TRAIN_CONFIG"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))
    s = orch.Settings.from_env()
    assert s.events_uri == str(tmp_path / "events") and s.lake_uri == str(tmp_path / "lake")
    assert s.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("RECSYS_LAKE_URI", "s3://lake/prod")
    assert orch.Settings.from_env().lake_uri == "s3://lake/prod"
    assert orch.snapshot_uri(orch.Settings.from_env(), "2026-03-01") == "s3://lake/prod/snapshots/as_of=2026-03-01"


@pytest.mark.parametrize("bad", ["2026-02-30", "yesterday", "2026-1-1; rm -rf /", ""])
def test_bad_dates_are_clear_errors(bad: str) -> None:
    with pytest.raises(DataError, match="invalid date"):
        orch.check_date(bad)


def test_train_reads_the_version_from_the_last_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = orch.Settings(home=tmp_path, events_uri="e", lake_uri="l", recs_uri="r", tracking_uri="t")
    calls: list[tuple[str, ...]] = []

    def fake(*argv: str) -> str:
        calls.append(argv)
        return "epoch 1 ...\nregistered recsys-multivae-pia version 7\n"

    monkeypatch.setattr(orch, "recsys", fake)
    assert orch.train(s, "l/snapshots/as_of=2026-01-01") == 7
    assert calls[0][:3] == ("train", "--snapshot", "l/snapshots/as_of=2026-01-01")
    monkeypatch.setattr(orch, "recsys", lambda *a: "trained, but no registration line\n")
    with pytest.raises(RuntimeError, match="did not print the registered version"):
        orch.train(s, "x")


def test_a_failing_command_raises_with_its_exit_code() -> None:
    with pytest.raises(RuntimeError, match="exit code 2"):
        orch.recsys("experiment", "--dataset", "no-such-data-set", "--out", "/tmp/never-written-recsys")


def test_gate_passes_the_gate_config_when_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, ...]] = []
    monkeypatch.setattr(orch, "recsys", lambda *a: seen.append(a) or "ok")
    base = {"home": tmp_path, "events_uri": "e", "lake_uri": "l", "recs_uri": "r", "tracking_uri": "t"}
    orch.gate(orch.Settings(**base), 3)
    orch.gate(orch.Settings(**base, gate_config="gates.yaml", gate_mode="dry-run"), 4)
    assert "--config" not in seen[0] and seen[0][seen[0].index("--version") + 1] == "3"
    assert seen[1][-2:] == ("--config", "gates.yaml") and seen[1][seen[1].index("--mode") + 1] == "dry-run"


def test_a_failing_command_never_shows_tracking_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.cli

    seen: list[list[str]] = []
    monkeypatch.setattr(pipeline.cli, "main", lambda argv: seen.append(argv) or 1)  # a gate rejection: exit 1
    s = orch.Settings(home=tmp_path, events_uri="e", lake_uri="l", recs_uri="r",
                      tracking_uri="https://alice:s3cret@mlflow.example.com/?token=t0k")
    with pytest.raises(RuntimeError, match="exit code 1") as e:
        orch.gate(s, 3)
    text = str(e.value)
    assert not [w for w in ("alice", "s3cret", "t0k") if w in text]
    assert "--tracking-uri https://mlflow.example.com/?token=***" in text and "--version 3" in text
    assert "https://alice:s3cret@mlflow.example.com/?token=t0k" in seen[0]  # the command itself still gets it
    with pytest.raises(RuntimeError) as e:
        orch.recsys("train", "--tracking-uri=https://alice:s3cret@h")
    assert "s3cret" not in str(e.value) and "--tracking-uri=https://h" in str(e.value)
