"""pipeline.cli.main: every error an operator can act on is one line per problem, `recsys CMD: error: ... Fix: ...`,
exit 2, no traceback and no pydantic documentation URL; a bug (any other exception) keeps its traceback."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pytest
from infer_support import events_table, tiny_bundle, write_events

from pipeline.cli import main as cli
from pipeline.cli.main import main


def _err_lines(capsys: pytest.CaptureFixture[str], command: str) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err and "errors.pydantic.dev" not in err
    lines = err.splitlines()
    assert lines and all(line.startswith(f"recsys {command}: error: ") and ". Fix: " in line for line in lines), err
    return lines


def test_train_config_errors_are_one_line_per_field_with_a_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "train.yaml"
    cfg.write_text("epochs: 0\nno_such_key: 1\nvae:\n  latent_dim: eight\n")
    assert main(["train", "--snapshot", str(tmp_path / "snap"), "--config", str(cfg)]) == 2
    lines = _err_lines(capsys, "train")
    assert len(lines) == 3
    assert "recsys train: error: epochs: must be >= 1 (got 0). Fix: set epochs to 1 or more (--epochs or --config)." in lines
    unknown = next(line for line in lines if "no_such_key" in line)
    assert "no_such_key: unknown key. Fix: remove it from --config (known keys: " in unknown
    assert "epochs" in unknown and "snapshot" in unknown
    nested = next(line for line in lines if "vae.latent_dim" in line)
    assert "must be a valid integer" in nested and "(got 'eight')" in nested
    assert not (tmp_path / "snap").exists()


def test_a_flag_error_names_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--snapshot", str(tmp_path), "--epochs", "0"]) == 2
    assert _err_lines(capsys, "train") == [
        "recsys train: error: epochs: must be >= 1 (got 0). Fix: set epochs to 1 or more (--epochs or --config)."]


def test_gate_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "gate.yaml"
    cfg.write_text("no_such_gate: 1\nchampion_tolerance: lots\n")
    assert main(["gate", "--model-version", "1", "--config", str(cfg), "--ledger", str(tmp_path / "ledger.jsonl"),
                 "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]) == 2
    lines = _err_lines(capsys, "gate")
    assert len(lines) == 2
    assert any(line.startswith("recsys gate: error: no_such_gate: unknown key. Fix: remove it from --config (known keys: ")
               and "champion_tolerance" in line for line in lines)
    assert any("champion_tolerance: must be a valid number" in line and "(got 'lots')" in line for line in lines)
    assert not (tmp_path / "ledger.jsonl").exists() and not (tmp_path / "mlflow.db").exists()


def test_infer_option_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "lake"
    assert main(["infer", "--date", "2024-05-01", "--events", str(tmp_path / "ev"), "--out", str(out),
                 "--top-n", "0", "--memory-budget-mb", "1"]) == 2
    lines = _err_lines(capsys, "infer")
    assert lines == ["recsys infer: error: top_n: must be >= 1 (got 0). Fix: set top_n to 1 or more (--top-n).",
                     "recsys infer: error: memory_budget_mb: must be >= 16 (got 1). "
                     "Fix: set memory_budget_mb to 16 or more (--memory-budget-mb)."]
    assert not out.exists()


def test_infer_catalogue_and_model_budget_option_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "lake"
    assert main(["infer", "--date", "2024-05-01", "--events", str(tmp_path / "ev"), "--out", str(out),
                 "--cold-slots", "-1", "--max-model-mb", "0"]) == 2
    lines = _err_lines(capsys, "infer")
    assert any(line.startswith("recsys infer: error: cold_slots: must be >= 0 (got -1)") and "(--cold-slots)" in line
               for line in lines)
    assert any(line.startswith("recsys infer: error: max_model_mb: must be >= 1 (got 0)") and "(--max-model-mb)" in line
               for line in lines)
    assert not out.exists()


def test_a_literal_and_a_validator_error() -> None:
    from pydantic import ValidationError

    from pipeline.serving.job import InferJob
    from pipeline.training.train_job import TrainJob

    with pytest.raises(ValidationError) as e:
        InferJob(date="2024-05-01", events="e", out="o", engine="flink")
    assert cli.validation_lines(e.value) == [
        "engine: must be 'local' or 'spark' (got 'flink'). Fix: set engine to 'local' or 'spark'."]
    with pytest.raises(ValidationError) as e:
        TrainJob(snapshot="s", model="nope")
    [line] = cli.validation_lines(e.value, {"--model", "--config"})
    assert line.startswith("model: unknown model 'nope': train one of ") and line.endswith(
        "Fix: correct model (--model or --config).")


def _bundle(tmp_path: Path) -> tuple[str, str]:
    model = tiny_bundle().save(tmp_path / "bundle")
    events = write_events(events_table(n_users=10), str(tmp_path / "events"))
    return str(model), events


def test_infer_out_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, events = _bundle(tmp_path)
    out = tmp_path / "out"
    out.write_text("keep me")
    assert main(["infer", "--date", "2024-05-03", "--events", events, "--out", str(out), "--model", model,
                 "--device", "cpu", "--no-progress"]) == 2
    [line] = _err_lines(capsys, "infer")
    assert f"cannot write {out}/recommendations/dt=2024-05-03: {out} is a file, not a folder" in line
    assert out.read_text() == "keep me"


def test_recs_out_is_a_file_is_one_line_naming_the_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A NotADirectoryError from pyarrow (errno set, the path only inside its message): one line, the path named."""
    out = tmp_path / "out"
    (out / "recommendations").parent.mkdir()
    (out / "recommendations").write_text("x")
    assert main(["recs", "--user", "1", "--out", str(out)]) == 2
    [line] = _err_lines(capsys, "recs")
    assert f"path {out}/recommendations has a file where a folder is expected" in line


@pytest.mark.parametrize("error, expected", [
    (PermissionError(errno.EACCES, "Permission denied", "/lake/out"),
     "path /lake/out is not accessible (permission denied). Fix: pass a path this user may read and write"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/lake/cfg.yaml"),
     "path /lake/cfg.yaml is a folder where a file is expected. Fix: pass a file path"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/lake/x"), "path /lake/x does not exist. Fix: "),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/lake/f/x"), "path /lake/f/x has a file where a folder"),
    (OSError(errno.ENOSPC, "No space left on device"), "a path cannot be written: no space left on the device"),
    (OSError("Unexpected end of stream"), "input/output error: Unexpected end of stream. Fix: check the path"),
])
def test_os_errors_are_one_line(error: OSError, expected: str, capsys: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.cli import serving

    def fail(args: object) -> int:
        raise error

    monkeypatch.setattr(serving, "cmd_recs", fail)
    assert main(["recs", "--user", "1", "--out", "/lake"]) == 2
    [line] = _err_lines(capsys, "recs")
    assert expected in line


def test_a_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.cli import serving

    def bug(args: object) -> int:
        raise KeyError("fallback_users")

    monkeypatch.setattr(serving, "cmd_recs", bug)
    with pytest.raises(KeyError, match="fallback_users"):
        main(["recs", "--user", "1", "--out", "/lake"])


def test_verbose_logs_the_traceback_of_a_handled_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="recsys")
    assert main(["-v", "recs", "--user", "1", "--date", "2024-02-31", "--out", str(tmp_path)]) == 2
    assert "not a calendar date" in capsys.readouterr().err
    assert "Traceback" in caplog.text


def test_a_multi_line_message_is_one_line_and_credentials_are_masked(monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.cli import serving

    def fail(args: object) -> int:
        raise RuntimeError("cannot reach http://alice:s3cret@mlflow:5000/\n  at line 2\n  at line 3")

    monkeypatch.setattr(serving, "cmd_recs", fail)
    assert main(["recs", "--user", "1", "--out", "/lake"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "s3cret" not in err and "alice" not in err and "at line 2 at line 3" in err


def test_experiment_out_is_a_file_fails_before_any_fit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "results"
    out.write_text("not a folder")
    assert main(["experiment", "--dataset", "synthetic", "--models", "popularity", "--seeds", "1",
                 "--out", str(out), "--no-progress"]) == 2
    [line] = _err_lines(capsys, "experiment")
    assert f"{out} is a file, not a folder" in line and out.read_text() == "not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_infer_out_not_writable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, events = _bundle(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        assert main(["infer", "--date", "2024-05-03", "--events", events, "--out", str(locked / "lake"),
                     "--model", model, "--device", "cpu", "--no-progress"]) == 2
    finally:
        locked.chmod(0o700)
    [line] = _err_lines(capsys, "infer")
    assert f"no permission to write in {locked}" in line


def test_s3_down_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    from pipeline.io import lake

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_EC2_METADATA_DISABLED": "true",
                 "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("RECSYS_S3_ENDPOINT", raising=False)
    monkeypatch.setattr(lake, "_down", {})
    assert main(["recs", "--user", "1", "--out", "s3://bucket/lake"]) == 2
    [line] = _err_lines(capsys, "recs")
    assert line.startswith(f"recsys recs: error: S3 endpoint http://127.0.0.1:{port} unreachable after 3 tries")


def test_a_library_error_without_a_fix_gets_one(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    import pyarrow as pa

    from pipeline.cli import serving

    def fail(args: object) -> int:
        raise pa.ArrowInvalid("Parquet magic bytes not found in footer.\nEither the file is corrupted")

    monkeypatch.setattr(serving, "cmd_recs", fail)
    assert main(["recs", "--user", "1", "--out", "/lake"]) == 2
    assert _err_lines(capsys, "recs") == [
        "recsys recs: error: Parquet magic bytes not found in footer. Either the file is corrupted. "
        "Fix: check the inputs and options of the command (-v logs where it failed)."]
