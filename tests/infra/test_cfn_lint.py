"""cfn-lint over every template, plus the properties we require of the templates read statically."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from cfnlint.decode import decode
from infra_support import INFRA, TEMPLATES, tool


def _cfn_lint(*paths: Path) -> subprocess.CompletedProcess[str]:
    exe = tool("cfn-lint")
    assert exe, "cfn-lint is a dev dependency: install the project with '.[dev]'"
    return subprocess.run([exe, "--format", "parseable", *map(str, paths)], capture_output=True, text=True, timeout=120)


def test_templates_present() -> None:
    assert {p.name for p in TEMPLATES} >= {"storage.yaml", "iam.yaml", "compute.yaml"}


def test_cfn_lint_clean() -> None:
    res = _cfn_lint(*TEMPLATES)
    assert res.returncode == 0, res.stdout + res.stderr


def test_cfn_lint_catches_a_broken_template(tmp_path: Path) -> None:
    """The lint step must be able to fail: a bad property and a dangling Ref are reported."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        'AWSTemplateFormatVersion: "2010-09-09"\n'
        "Resources:\n"
        "  B:\n"
        "    Type: AWS::S3::Bucket\n"
        "    Properties:\n"
        "      VersioningConfiguration: {Status: Sometimes}\n"
        "      BucketName: !Ref Missing\n"
    )
    res = _cfn_lint(bad)
    assert res.returncode != 0
    assert "Missing" in res.stdout and "Sometimes" in res.stdout


def _load(name: str) -> dict[str, Any]:
    tpl, errors = decode(str(INFRA / name))
    assert not errors, errors
    return tpl


def _resources(tpl: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in tpl["Resources"].items() if v["Type"] == kind}


def test_every_bucket_is_locked_down() -> None:
    tpl = _load("storage.yaml")
    buckets = _resources(tpl, "AWS::S3::Bucket")
    policies = {v["Properties"]["Bucket"]["Ref"]: v["Properties"]["PolicyDocument"]
                for v in _resources(tpl, "AWS::S3::BucketPolicy").values()}
    assert len(buckets) == 5
    for name, b in buckets.items():
        p = b["Properties"]
        assert p["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]["ServerSideEncryptionByDefault"]["SSEAlgorithm"]
        assert p["VersioningConfiguration"]["Status"] == "Enabled", name
        assert all(p["PublicAccessBlockConfiguration"][k] is True for k in
                   ("BlockPublicAcls", "BlockPublicPolicy", "IgnorePublicAcls", "RestrictPublicBuckets")), name
        assert p["OwnershipControls"]["Rules"][0]["ObjectOwnership"] == "BucketOwnerEnforced", name
        assert p["LifecycleConfiguration"]["Rules"], name
        assert b["DeletionPolicy"] == "Retain", name  # deleting the stack must never delete the lake
        deny = [s for s in policies[name]["Statement"] if s["Effect"] == "Deny"]
        assert deny and deny[0]["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}, name


@pytest.mark.parametrize("name", ["iam.yaml", "compute.yaml", "storage.yaml"])
def test_no_hardcoded_account_or_credentials(name: str) -> None:
    text = (INFRA / name).read_text()
    assert "123456789012" not in text and "AKIA" not in text and "aws_secret_access_key" not in text.lower()


def test_mwaa_private_with_logs() -> None:
    env = _resources(_load("compute.yaml"), "AWS::MWAA::Environment")
    (props,) = [v["Properties"] for v in env.values()]
    assert props["WebserverAccessMode"] == "PRIVATE_ONLY"
    assert all(c["Enabled"] for c in props["LoggingConfiguration"].values())
