"""pipeline.training.gate: GateJob re-scores, checks, records and promotes only when it should."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from pipeline.cli.main import main
from pipeline.errors import DataError
from pipeline.io import registry
from pipeline.training import gate as gate_job
from pipeline.training.gate import GateJob
from pipeline.training.gates import GateCheck, GateConfig, GateResult, load_gate_config
from pipeline.training.ledger import Ledger

from .conftest import NAME, aliases, copy_version, events, gate, promote, rollback, snapshot_digest, state


def test_gate_job_is_validated_and_frozen() -> None:
    job = GateJob(model_name=NAME, version="3")
    assert job.mode == "enabled" and job.gates == GateConfig() and job.ledger_uri is None
    with pytest.raises(ValueError, match="mode"):
        GateJob(model_name=NAME, version="3", mode="later")
    with pytest.raises(ValueError, match="cfg"):
        GateJob(model_name=NAME, version="3", cfg=GateConfig())  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="frozen"):
        job.version = "4"  # type: ignore[misc]


@pytest.mark.parametrize(("override", "failing"), [
    ({"floors": {"ndcg@100": 0.99}}, "floor.ndcg@100"),
    ({"coverage_floor": 1.0}, "coverage"),
    ({"ease_margin": -0.5}, "baseline.ease"),  # must beat EASE by 50%: cannot
    ({"popularity_margin": 3.0}, "baseline.popularity"),
])
def test_candidate_failing_a_gate_stays_challenger(trained: dict[str, str], easy_gates: GateConfig,
                                                   override: dict, failing: str) -> None:
    good, bad = trained["good"], trained["bad"]
    promote(bad, "a weak champion, so the champion gates pass")
    before = aliases()
    c = registry.client()
    c.set_registered_model_alias(NAME, "challenger", good)
    o = gate(good, gates=easy_gates.model_copy(update=override))
    assert [r.gate for r in o.verdicts if r.status == "fail"] == [failing]
    assert not o.promoted and aliases() == before | {"challenger": good}
    assert c.get_model_version(NAME, good).tags["gate.failed"] == failing
    assert events()[-1] == "rejection"


def test_dry_run_moves_nothing(trained: dict[str, str], easy_gates: GateConfig) -> None:
    before = aliases()
    assert main(["gate", "--model", NAME, "--model-version", trained["good"], "--mode", "dry-run"]) == 0  # default gates
    o = gate(trained["good"], mode="dry-run", gates=easy_gates)
    assert o.passed and not o.promoted and aliases() == before and events() == []
    assert o.model_name == NAME and o.version == trained["good"] and o.champion is None
    assert "- mode: dry-run; verdict: **passed**; promoted: False" in o.report
    back = GateResult.model_validate(o.to_xcom())  # the result travels between tasks as JSON
    assert back == o and isinstance(back.verdicts[0], GateCheck)
    assert registry.client().get_model_version(NAME, trained["good"]).tags["gate.mode"] == "dry-run"


def test_gate_cli_exit_code_on_rejection(trained: dict[str, str], tmp_path: Path) -> None:
    f = tmp_path / "g.yaml"
    f.write_text("coverage_floor: 1.0\n")
    assert main(["gate", "--model", NAME, "--model-version", trained["good"], "--config", str(f)]) == 1
    assert main(["gate", "--model", NAME, "--model-version", "99"]) == 2  # unknown version: one-line error
    assert "champion" not in aliases()


def test_gate_refuses_when_aliases_moved_while_scoring(trained: dict[str, str], easy_gates: GateConfig,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    good, bad = trained["good"], trained["bad"]
    promote(bad, "1")
    promote(good, "2")  # champion good, previous bad
    cand = copy_version(good)  # same weights as the champion: passes against it
    real, calls = gate_job.rescore, []

    def rescore_during_rollback(*a, **kw):
        if not calls:
            rollback(reason="operator pulls good while the gate scores")
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(gate_job, "rescore", rescore_during_rollback)
    after_rollback = {"champion": bad, "challenger": bad}  # trained last: bad is the challenger
    with pytest.raises(DataError, match=f"changed while this command ran \\(champion: {good} -> {bad}, "
                                        f"previous: {bad} -> none\\).*Fix: re-run the command"):
        gate(cand, gates=easy_gates)
    assert aliases() == after_rollback  # the rollback stands
    assert events() == ["manual-promotion", "manual-promotion", "rollback"]
    assert "gate.verdict" not in registry.client().get_model_version(NAME, cand).tags


@pytest.mark.parametrize("broken", ["chart", "log_artifact"])
def test_gate_artifact_failure_is_a_warning_not_a_failed_gate(trained: dict[str, str], easy_gates: GateConfig,
                                                               monkeypatch: pytest.MonkeyPatch, caplog,
                                                               broken: str) -> None:
    from mlflow import MlflowClient

    from pipeline.training import plots

    def boom(*a, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(*((plots, "gate_chart", boom) if broken == "chart" else (MlflowClient, "log_artifact", boom)))
    good = trained["good"]
    with caplog.at_level(logging.WARNING, logger="pipeline.training.gate_report"):
        o = gate(good, gates=easy_gates)
    assert o.passed and o.promoted and aliases()["champion"] == good
    c = registry.client()
    assert c.get_model_version(NAME, good).tags["gate.verdict"] == "passed"
    assert events() == ["promotion"] and Ledger().read()[0]["version"] == good
    assert any("OSError: disk full" in w for w in o.warnings)
    assert "disk full" in caplog.text and "the verdict and the ledger line are recorded" in caplog.text
    # the later steps still ran (artifacts live in a store shared between tests; metrics are private)
    assert "gate.candidate.ndcg_at_100" in c.get_run(trained["good_run"]).data.metrics


def test_snapshot_rebuilt_since_training_is_refused(trained: dict[str, str], easy_gates: GateConfig, caplog) -> None:
    good, bad = trained["good"], trained["bad"]
    c = registry.client()
    uri = c.get_model_version(NAME, good).tags["snapshot_uri"]
    promote(bad, "a champion to keep")
    before = state()
    c.set_model_version_tag(NAME, good, "snapshot_digest", "0" * 16)  # trained on another build of that folder
    with pytest.raises(DataError, match=r"was rebuilt since .* was trained.*Fix: retrain on the current snapshot"):
        gate(good, gates=easy_gates)
    assert state() == before and c.get_model_version(NAME, good).tags["gate.verdict"] == "pending"
    c.set_model_version_tag(NAME, good, "snapshot_digest", snapshot_digest(uri))
    with caplog.at_level(logging.WARNING, logger="pipeline.training.gate"):
        o = gate(good, gates=easy_gates)
    assert o.promoted and o.warnings == [] and "snapshot_digest" not in caplog.text
    older = copy_version(good)  # registered before digests: gated as before, with a warning
    c.delete_model_version_tag(NAME, older, "snapshot_digest")
    o = gate(older, gates=easy_gates, mode="dry-run")
    assert o.passed and "has no snapshot_digest tag" in o.warnings[0] and "has no snapshot_digest tag" in o.report
    assert "has no snapshot_digest tag" in caplog.text


def test_gate_without_baselines_fails_closed(trained: dict[str, str], easy_gates: GateConfig) -> None:
    good, bad = trained["good"], trained["bad"]
    c = registry.client()
    for k in [k for k in c.get_model_version(NAME, good).tags if k.startswith("baseline.")]:
        c.delete_model_version_tag(NAME, good, k)  # as if trained with `baselines: false`
    o = gate(good, gates=easy_gates)  # first model: champion gates skipped, so only floors would remain
    assert not o.promoted and "champion" not in aliases() and events() == ["rejection"]
    base = [r for r in o.verdicts if r.gate.startswith("baseline.")]
    assert [r.status for r in base] == ["fail", "fail"]
    assert all("baselines were not computed at training (baselines: false)" in r.detail for r in base)
    assert "missing baselines (trained with baselines: false) fail the gate" in o.report
    o = gate(good, gates=easy_gates.model_copy(update={"allow_missing_baselines": True}))
    assert o.promoted and aliases() == {"champion": good, "challenger": bad}
    assert {r.status for r in o.verdicts if r.gate.startswith("baseline.")} == {"skipped"}


# -- one line for bad input, nothing moved (issue 32, items 10 and 11b) ------------------------------------------

def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize(("text", "expect"), [
    # the file itself: one DataError naming it
    ("floors: {ndcg@100: 0.05\n", r"gate config {f} is not valid YAML \(.* at line 2, column 1\)"),
    ("metrics: !!python/object/apply:os.system ['touch {marker}']\n", "gate config {f} uses a YAML tag that is not allowed"),
    ("- a list\n", "gate config {f} is not a mapping"),
    ("1: 2\n", "gate config {f} has non-text key"),
    # its values: the CLI's one line per invalid field, naming the key and the value
    ("metrics: [recall@20, hit@10]\n", r"metrics: unknown gate metric\(s\) 'hit@10': the gate measures recall@20"),
    ("primary: mrr@5\n", r"primary: unknown gate metric\(s\) 'mrr@5': the gate measures"),
    ("floors: {precision@3: 0.1}\n", r"floors: unknown gate metric\(s\) 'precision@3': floors can be set on"),
    ("floors: {coverage@50: 0.1}\n", r"floor 'coverage@50' is not measured: coverage is measured at top_n = 20"),
    ("coverage_floor: 2\n", "coverage_floor: must be <= 1.0"),
    ("no_such_gate: 1\n", "no_such_gate: unknown key"),
])
def test_bad_gate_config_is_one_line(trained: dict[str, str], tmp_path: Path, capsys, text: str, expect: str) -> None:
    promote(trained["bad"], "a champion to keep")
    marker = tmp_path / "pwned"
    f = tmp_path / "gates.yaml"
    f.write_text(text.replace("{marker}", str(marker)))
    before = state()
    capsys.readouterr()
    assert main(["gate", "--model", NAME, "--model-version", trained["good"], "--config", str(f)]) == 2
    line = _one_error_line(capsys)
    assert re.search(expect.replace("{f}", re.escape(str(f))), line) and "Fix:" in line, line
    assert state() == before and not marker.exists()
    assert registry.client().get_model_version(NAME, trained["good"]).tags["gate.verdict"] == "pending"


def test_unknown_metric_is_refused_when_the_config_is_built() -> None:
    from pipeline.training.evaluation import METRICS
    from pipeline.training.gates import KNOWN_METRICS

    assert KNOWN_METRICS == METRICS  # what training records as baselines is what the gate measures
    with pytest.raises(ValueError, match="unknown gate metric"):
        GateConfig(metrics=("recall@20", "map@10"))
    assert GateConfig(floors={"coverage@50": 0.1}, top_n=50).floors == {"coverage@50": 0.1}
    with pytest.raises(DataError, match=r"gate config .*missing.yaml not found"):
        load_gate_config(Path("missing.yaml"))


@pytest.mark.parametrize("command", ["gate", "promote"])
def test_a_version_that_does_not_exist_is_one_line(trained: dict[str, str], capsys, command: str) -> None:
    promote(trained["good"], "a champion to keep")
    before = state()
    capsys.readouterr()
    argv = ["--reason", "x"] if command == "promote" else []
    assert main([command, "--model", NAME, "--model-version", "99", *argv]) == 2
    line = _one_error_line(capsys)
    assert "no version 99 of registered model 'recsys-test'" in line and "Fix: check --model/--model-version" in line
    assert state() == before


def test_report_mentions_missing_baselines_only_when_they_are_missing(trained: dict[str, str],
                                                                      easy_gates: GateConfig) -> None:
    o = gate(trained["good"], gates=easy_gates, mode="dry-run")
    assert "baseline popularity" in o.metrics and "missing baselines" not in o.report
    c = registry.client()
    for k in [k for k in c.get_model_version(NAME, trained["good"]).tags if k.startswith("baseline.")]:
        c.delete_model_version_tag(NAME, trained["good"], k)
    o = gate(trained["good"], gates=easy_gates.model_copy(update={"allow_missing_baselines": True}), mode="dry-run")
    assert "missing baselines (trained with baselines: false) are skipped" in o.report


def test_a_failed_upload_warning_carries_no_credentials(trained: dict[str, str], easy_gates: GateConfig,
                                                        monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    from mlflow import MlflowClient

    def refused(*a, **kw):
        raise OSError("PUT https://alice:s3cret@artifacts.example.com/x?X-Amz-Signature=t0k failed")

    monkeypatch.setattr(MlflowClient, "log_artifact", refused)
    with caplog.at_level(logging.WARNING):
        o = gate(trained["good"], gates=easy_gates, mode="dry-run")
    assert any("report upload" in w and "artifacts.example.com" in w for w in o.warnings)
    assert not [s for s in ("alice", "s3cret", "t0k") if s in str(o.to_xcom()) + caplog.text]
