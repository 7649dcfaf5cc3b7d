"""The remote entry point's MLflow credentials: the engine names a Secrets Manager secret (RECSYS_MLFLOW_SECRET_ARN,
a reference only), `remote.main` reads it before the job runs and sets MLFLOW_TRACKING_USERNAME/PASSWORD or
MLFLOW_TRACKING_TOKEN; a secret it cannot use fails the job with one line naming the fix, and no value or secret text
ever reaches the outcome, the log or stderr.

The secrets live on the session's moto server on 127.0.0.1 (the shared `moto_server` fixture: boto3 finds it through
AWS_ENDPOINT_URL, as remote.py's client does). The job is a BuildMatrixJob whose `run` records the environment it
runs with (the existing remote tests' pattern): what matters here is what the job sees, not what it builds."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

from pipeline.data.build_matrix import BuildMatrixJob, BuildResult
from pipeline.errors import DataError
from pipeline.orchestration import remote

VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
PASSWORD = "pw-" + uuid.uuid4().hex  # unique: any occurrence in a log or an outcome is a leak


@pytest.fixture
def secrets(moto_server: str) -> Any:
    return boto3.client("secretsmanager", endpoint_url=moto_server, region_name="us-east-1")


def _secret(secrets: Any, **value: Any) -> str:
    """A new secret (SecretString, or SecretBinary when given `binary`) on moto; returns its complete ARN."""
    name = f"recsys/test/mlflow-{uuid.uuid4().hex[:8]}"
    if "binary" in value:
        return secrets.create_secret(Name=name, SecretBinary=value["binary"])["ARN"]
    return secrets.create_secret(Name=name, SecretString=value["string"])["ARN"]


@pytest.fixture
def job_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, list[dict[str, str | None]]]:
    """A staged envelope whose job records the MLflow variables it runs with; stale values of all three are set
    first (a process may inherit some) and restored after."""
    seen: list[dict[str, str | None]] = []

    def run(self: BuildMatrixJob) -> BuildResult:
        seen.append({v: os.environ.get(v) for v in VARS})
        return BuildResult(snapshot_uri=self.snapshot_uri(), digest="d", counts={})

    monkeypatch.setattr(BuildMatrixJob, "run", run)
    for v in VARS:
        monkeypatch.setenv(v, "stale")
    job = BuildMatrixJob(events=str(tmp_path / "events"), as_of=dt.date(2026, 1, 17), out=str(tmp_path / "lake"), window_days=14)
    return remote.stage(job, str(tmp_path / "staging")), seen


def _outcome(uri: str) -> dict[str, Any]:
    return json.loads(Path(uri).with_name("outcome.json").read_text())


def test_the_job_runs_with_the_credentials_of_its_secret(secrets: Any, job_env: Any, monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture) -> None:
    uri, seen = job_env
    arn = _secret(secrets, string=json.dumps({"username": "alice", "password": PASSWORD}))
    monkeypatch.setenv(remote.MLFLOW_SECRET_ENV, arn)
    caplog.set_level(logging.DEBUG)
    assert remote.main([uri]) == 0
    assert seen == [{"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": PASSWORD,
                     "MLFLOW_TRACKING_TOKEN": None}]  # the other form's stale value is gone
    assert _outcome(uri)["ok"] is True
    assert f"MLflow credentials (basic) read from {arn}" in caplog.text
    out = capsys.readouterr()
    for text in (caplog.text, out.out, out.err, Path(uri).with_name("outcome.json").read_text(), Path(uri).read_text()):
        assert PASSWORD not in text and "alice" not in text


def test_a_token_secret_sets_the_token_only(secrets: Any, job_env: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    uri, seen = job_env
    monkeypatch.setenv(remote.MLFLOW_SECRET_ENV, _secret(secrets, string=json.dumps({"token": PASSWORD})))
    assert remote.main([uri]) == 0
    assert seen == [{"MLFLOW_TRACKING_USERNAME": None, "MLFLOW_TRACKING_PASSWORD": None, "MLFLOW_TRACKING_TOKEN": PASSWORD}]


def test_without_a_secret_the_environment_is_left_alone(job_env: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """No RECSYS_MLFLOW_SECRET_ARN (the matrix build; a server without auth): nothing is read or changed."""
    uri, seen = job_env
    monkeypatch.delenv(remote.MLFLOW_SECRET_ENV, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # any AWS call would fail the job
    assert remote.main([uri]) == 0
    assert seen == [dict.fromkeys(VARS, "stale")]


BAD = {  # case: (the secret, what the one line must say)
    "missing": (None, r"the MLflow secret arn:aws:secretsmanager:us-east-1:\d+:secret:recsys/test/gone-AbC123 does not "
                      r"exist .*Fix: create it \(docs/runbook.md, 'Running on AWS'\) or set RECSYS_AWS_MLFLOW_SECRET_ARN"),
    "not-json": ({"string": f"username=alice password={PASSWORD}"}, r"is not JSON\. Fix: store it as a JSON string"),
    "wrong-keys": ({"string": json.dumps({"user": "alice", "pass": PASSWORD})},
                   r"has neither exactly the keys username and password nor exactly token\. Fix: store it as a JSON"),
    "both-forms": ({"string": json.dumps({"username": "alice", "password": PASSWORD, "token": PASSWORD})},
                   r"has neither exactly the keys"),
    "not-an-object": ({"string": json.dumps([PASSWORD])}, r"has neither exactly the keys"),
    "empty-value": ({"string": json.dumps({"token": ""})}, r"has an empty, multi-line or non-string value"),
    "binary": ({"binary": PASSWORD.encode()}, r"holds binary data, not a JSON string\. Fix: store it as a JSON string"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_secret_it_cannot_use_fails_the_job_with_one_line_and_no_secret_text(
        case: str, secrets: Any, job_env: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture) -> None:
    uri, seen = job_env
    value, message = BAD[case]
    account = boto3.client("sts").get_caller_identity()["Account"]
    arn = (_secret(secrets, **value) if value is not None
           else f"arn:aws:secretsmanager:us-east-1:{account}:secret:recsys/test/gone-AbC123")
    monkeypatch.setenv(remote.MLFLOW_SECRET_ENV, arn)
    caplog.set_level(logging.DEBUG)
    assert remote.main([uri]) == 1
    assert seen == []  # the job never ran
    outcome = _outcome(uri)
    assert outcome["ok"] is False and outcome["error_type"] == "DataError"
    assert "\n" not in outcome["error"] and arn in outcome["error"], outcome
    import re

    assert re.search(message, outcome["error"]), outcome["error"]
    with pytest.raises(remote.RemoteJobFailed, match=r"remote build_matrix job failed: DataError: .*MLflow secret"):
        remote.collect(uri)  # the Airflow side's task fails with that line
    err = capsys.readouterr().err
    assert "recsys remote job failed: DataError: " in err
    for text in (caplog.text, err, Path(uri).with_name("outcome.json").read_text()):
        assert PASSWORD not in text and "alice" not in text, case
    assert all(os.environ[v] == "stale" for v in VARS)  # nothing half-set


def test_an_unreachable_secrets_manager_fails_the_job_with_the_network_fix(job_env: Any,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    uri, seen = job_env
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv(remote.MLFLOW_SECRET_ENV, "arn:aws:secretsmanager:us-east-1:123456789012:secret:x/mlflow-AbC123")
    assert remote.main([uri]) == 1 and seen == []
    error = _outcome(uri)["error"]
    assert "Secrets Manager could not be reached" in error and "Fix: give the job's network a route" in error, error


def test_access_denied_names_the_iam_fix() -> None:
    """moto does not enforce IAM, so the service's AccessDenied answer is built here (the one thing faked): the line
    names the stack parameter that grants the read."""
    arn = "arn:aws:secretsmanager:eu-west-1:111122223333:secret:recsys/prod/mlflow-AbC123"
    denied = ClientError({"Error": {"Code": "AccessDeniedException", "Message": "User: x is not authorized"}},
                         "GetSecretValue")
    err = remote._secret_error(arn, denied)
    assert isinstance(err, DataError) and "may not read the MLflow secret" in str(err)
    assert "infra/iam.yaml with MlflowSecretArn" in err.fix


def test_a_job_error_that_quotes_a_credential_is_masked(secrets: Any, job_env: Any,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    uri, _ = job_env

    def leaky(self: BuildMatrixJob) -> BuildResult:
        raise RuntimeError(f"401 from the tracking server for token {os.environ['MLFLOW_TRACKING_TOKEN']}")

    monkeypatch.setattr(BuildMatrixJob, "run", leaky)
    monkeypatch.setenv(remote.MLFLOW_SECRET_ENV, _secret(secrets, string=json.dumps({"token": PASSWORD})))
    assert remote.main([uri]) == 1
    error = _outcome(uri)["error"]
    assert error == "401 from the tracking server for token ***", error
