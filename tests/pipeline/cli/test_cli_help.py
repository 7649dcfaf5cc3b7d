"""pipeline.cli.main's parsers: one meaning per flag, every option explained with its default, `--tracking-uri`
wherever a command talks to MLflow, `recsys --version` from the package metadata. Walks every sub-command, so a
command added later is held to the same rules."""

from __future__ import annotations

import argparse
import importlib.metadata
import re
from pathlib import Path

import pytest

from pipeline.cli.main import build_parser, main

# the trainable architectures (pipeline.training.train_job.AUTOENCODERS and the experiment's baselines)
ARCHITECTURES = ("multivae-pia", "multivae", "multidae", "recvae-pia", "recvae", "ease", "popularity")
_ARCH = re.compile(r"(?<![\w/-])(" + "|".join(map(re.escape, ARCHITECTURES)) + r")(?![\w-])")
# flags that name an MLflow registered model (or a models:/ URI): their command talks to the registry
_REGISTRY_FLAGS = ("--model", "--registered-name")
TALK_TO_MLFLOW = {"train", "gate", "promote", "rollback", "diagnose", "infer"}


def _commands() -> dict[str, argparse.ArgumentParser]:
    p = build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


COMMANDS = _commands()


def test_the_walk_sees_every_area() -> None:
    assert {"synth", "ingest", "build-matrix", "train", "gate", "promote", "rollback", "diagnose", "infer", "recs",
            "experiment"} <= set(COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_has_help_and_shows_its_default(command: str) -> None:
    parser = COMMANDS[command]
    formatter = parser._get_formatter()
    for a in _options(parser):
        assert (a.help or "").strip(), f"recsys {command} {a.option_strings[0]} has no help text"
        if a.required or a.nargs == 0:  # required: no default; on/off flags: the flag is the value
            continue
        shown = formatter._get_help_string(a) or ""
        assert "default" in shown.lower(), f"recsys {command} {a.option_strings[0]}: help does not give the default"
    text = parser.format_help()
    for a in _options(parser):  # a concrete default is printed as its value
        if not a.required and a.nargs != 0 and a.default not in (None, "") and "default" not in (a.help or "").lower():
            assert f"(default: {a.default})" in " ".join(text.split()), (command, a.option_strings)


def test_defaults_are_printed_as_values(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["build-matrix", "--help"])
    assert e.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "Spark master URL (default: local[*])" in help_text
    assert "days in the window, AS_OF included (default: 28)" in help_text


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_model_is_a_registered_name_or_uri_never_an_architecture(command: str) -> None:
    for a in _options(COMMANDS[command]):
        if "--model" in a.option_strings:
            assert not _ARCH.search(a.help or ""), f"recsys {command} --model lists architectures: {a.help!r}"
            assert re.search(r"registered model|models:/", a.help or ""), f"recsys {command} --model: {a.help!r}"


def test_train_takes_the_architecture_as_architecture(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:  # the old meaning of --model on train is gone: argparse refuses it
        main(["train", "--snapshot", str(tmp_path), "--model", "multivae"])
    assert e.value.code == 2
    assert "unrecognized arguments: --model" in capsys.readouterr().err
    # a bad architecture is named by the flag that set it
    assert main(["train", "--snapshot", str(tmp_path), "--architecture", "transformer"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'transformer'" in err and "(--architecture or --config)" in err, err


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_commands_that_talk_to_mlflow_take_a_tracking_uri(command: str) -> None:
    flags = set(COMMANDS[command]._option_string_actions)
    if command in TALK_TO_MLFLOW or flags & set(_REGISTRY_FLAGS):
        assert "--tracking-uri" in flags, f"recsys {command} talks to MLflow but has no --tracking-uri"


def test_version_comes_from_the_package_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"recsys {importlib.metadata.version('recsys-pia')}"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_version_means_the_program_version_only(command: str) -> None:
    """`--version` is `recsys --version`; a model version is --model-version, a table version --table-version."""
    assert "--version" not in COMMANDS[command]._option_string_actions, f"recsys {command} redefines --version"
