"""IAM derived from the jobs: the actions each role needs, from the DAGs' tasks in the `aws` profile, against what
infra/iam.yaml grants, both ways.

The needs come from pipeline/orchestration/aws/iam.py, next to the code that performs them: each operator's API calls,
each job kind's S3 areas (under its job role), each Python task's S3 areas (under the Airflow role) and what each
service does with its role. The DAG files are parsed with RECSYS_PROFILE=aws through Airflow's DagBag, so a new
task with no declared needs, a need that no policy grants, or a grant that no task needs each fails here.
Conditions are not compared, except the s3:prefix of s3:ListBucket (the prefix is part of the resource).

Both ways of deploying are checked: without the MLflow credentials' secret (RECSYS_AWS_MLFLOW_SECRET_ARN unset, the
template's MlflowSecretArn empty: its !If grants resolve to nothing) and with it (the jobs that use MLflow read it).
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import Any

import pytest
from cfnlint.decode import decode
from infra_support import INFRA

DAGS = Path(__file__).resolve().parents[2] / "dags"
MLFLOW_SECRET = "arn:aws:secretsmanager:eu-west-1:111122223333:secret:recsys/prod/mlflow-AbC123"
VALUES = {"AWS::Partition": "aws", "AWS::Region": "eu-west-1", "AWS::AccountId": "111122223333", "AWS::StackName": "st",
          "Project": "recsys", "Environment": "prod", "DataLakeBucket": "lake-b", "ArtifactsBucket": "art-b",
          "RecommendationsBucket": "recs-b", "AirflowBucket": "af-b", "MwaaEnvironmentName": "recsys-prod",
          "MlflowSecretArn": ""}  # set per case by the `secret` fixture
ROLES = {"TrainingRole": "training", "SparkBuildRole": "spark-build", "InferenceRole": "inference",
         "AirflowExecutionRole": "airflow"}
AWS_ENV = {  # a complete, valid `aws` profile (the values only need to parse: nothing is called)
    "RECSYS_PROFILE": "aws", "RECSYS_AWS_REGION": "eu-west-1", "RECSYS_AWS_EMR_APPLICATION_ID": "00abc123def45678",
    "RECSYS_AWS_EMR_BUILD_ROLE_ARN": "arn:aws:iam::111122223333:role/recsys-prod-spark-build",
    "RECSYS_AWS_EMR_INFER_ROLE_ARN": "arn:aws:iam::111122223333:role/recsys-prod-inference",
    "RECSYS_AWS_EMR_ENTRY_POINT": "local:///opt/recsys/remote.py",
    "RECSYS_AWS_TRAINING_ROLE_ARN": "arn:aws:iam::111122223333:role/recsys-prod-training",
    "RECSYS_AWS_TRAINING_IMAGE_URI": "111122223333.dkr.ecr.eu-west-1.amazonaws.com/recsys-train:abc1234",
    "RECSYS_AWS_TRAINING_OUTPUT_URI": "s3://art-b/sagemaker-output",
}

Need = tuple[str, str]


def _sub(text: str, values: dict[str, str] | None = None) -> str:
    v = VALUES if values is None else values
    return re.sub(r"\$\{([^}]+)\}", lambda m: v[m.group(1)], text)


def _template() -> dict[str, Any]:
    tpl, errors = decode(str(INFRA / "iam.yaml"))
    assert not errors, errors
    return tpl


def _value(node: Any, tpl: dict[str, Any], values: dict[str, str]) -> str:
    """The few intrinsics iam.yaml's statements use: Fn::Sub (string), Ref, Fn::GetAtt <Role>.Arn."""
    if isinstance(node, str):
        return node
    if "Fn::Sub" in node:
        return _sub(node["Fn::Sub"], values)
    if "Ref" in node:
        return values[node["Ref"]]
    if "Fn::GetAtt" in node:
        logical, attr = node["Fn::GetAtt"]
        assert attr == "Arn", node
        name = _value(tpl["Resources"][logical]["Properties"]["RoleName"], tpl, values)
        return f"arn:{values['AWS::Partition']}:iam::{values['AWS::AccountId']}:role/{name}"
    raise AssertionError(f"unexpected intrinsic {node}")


def _condition(node: Any, tpl: dict[str, Any], values: dict[str, str]) -> bool:
    """The template's Conditions as CloudFormation evaluates them: Fn::Not, Fn::Equals, Fn::And, Fn::Or, Condition."""
    if isinstance(node, str):
        return _condition(tpl["Conditions"][node], tpl, values)
    (fn, args), = node.items()
    if fn == "Condition":
        return _condition(tpl["Conditions"][args], tpl, values)
    if fn == "Fn::Not":
        return not _condition(args[0], tpl, values)
    if fn == "Fn::Equals":
        return _value(args[0], tpl, values) == _value(args[1], tpl, values)
    if fn in ("Fn::And", "Fn::Or"):
        return (all if fn == "Fn::And" else any)(_condition(a, tpl, values) for a in args)
    raise AssertionError(f"unexpected condition {node}")


def _statements(statements: list[Any], tpl: dict[str, Any], values: dict[str, str]) -> list[dict[str, Any]]:
    """A policy's statements with each `!If [cond, statement, !Ref AWS::NoValue]` resolved as CloudFormation does."""
    out = []
    for st in statements:
        if "Fn::If" in st:
            cond, yes, no = st["Fn::If"]
            st = yes if _condition(cond, tpl, values) else no
            if st == {"Ref": "AWS::NoValue"}:
                continue
        out.append(st)
    return out


def _list(x: Any) -> list[Any]:
    return x if isinstance(x, list) else [x]


def granted(tpl: dict[str, Any], values: dict[str, str] | None = None) -> dict[str, set[Need]]:
    """Every (action, resource) an Allow statement grants, per role, with the template's parameters `values`
    (VALUES by default); s3:ListBucket as bucket#prefix."""
    values = VALUES if values is None else values
    out: dict[str, set[Need]] = {}
    for logical, role in ROLES.items():
        pairs: set[Need] = set()
        for policy in tpl["Resources"][logical]["Properties"]["Policies"]:
            for st in _statements(policy["PolicyDocument"]["Statement"], tpl, values):
                assert st["Effect"] == "Allow", st
                if "NotResource" in st:
                    resources = ["!" + _value(r, tpl, values) for r in _list(st["NotResource"])]
                else:
                    resources = [_value(r, tpl, values) for r in _list(st["Resource"])]
                for action in _list(st["Action"]):
                    if action == "s3:ListBucket":
                        prefixes = _list(st.get("Condition", {}).get("StringLike", {}).get("s3:prefix", "*"))
                        pairs |= {(action, f"{r}#{p}") for r in resources for p in prefixes}
                    else:
                        pairs |= {(action, r) for r in resources}
                    if action == "iam:PassRole":  # a passed role goes to one service only
                        assert "iam:PassedToService" in str(st.get("Condition")), st
        out[role] = pairs
    return out


def _covers(wide: Need, narrow: Need) -> bool:
    """Does the grant/need `wide` include `narrow` (IAM wildcards; NotResource compared as written)?"""
    (wa, wr), (na, nr) = wide, narrow
    if not fnmatch.fnmatchcase(na, wa):
        return False
    if wr.startswith("!") or nr.startswith("!"):
        return wr == nr
    return fnmatch.fnmatchcase(nr, wr)


def missing_and_extra(need: dict[str, set[Need]], grant: dict[str, set[Need]]) -> tuple[list[str], list[str]]:
    missing = [f"{role}: {a} on {r}" for role, pairs in need.items() for a, r in sorted(pairs)
               if not any(_covers(g, (a, r)) for g in grant[role])]
    extra = [f"{role}: {a} on {r}" for role, pairs in grant.items() for a, r in sorted(pairs)
             if not any(_covers(n, (a, r)) for n in need[role])]
    return missing, extra


@pytest.fixture(scope="module", params=[None, MLFLOW_SECRET], ids=["no-mlflow-secret", "mlflow-secret"])
def secret(request: pytest.FixtureRequest) -> str | None:
    """The MLflow credentials' secret, unset or set: the same value in the profile and the stack's MlflowSecretArn."""
    return request.param


@pytest.fixture(scope="module")
def values(secret: str | None) -> dict[str, str]:
    """The stack's parameters for this case."""
    return {**VALUES, "MlflowSecretArn": secret or ""}


@pytest.fixture(scope="module")
def aws_tasks(tmp_path_factory: pytest.TempPathFactory, secret: str | None) -> list[Any]:
    """Every task of both DAGs as parsed by Airflow with the `aws` profile."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIRFLOW_HOME", str(tmp_path_factory.mktemp("airflow")))
        mp.setenv("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
        mp.setenv("RECSYS_HOME", str(tmp_path_factory.mktemp("home")))
        for k, v in AWS_ENV.items():
            mp.setenv(k, v)
        if secret:
            mp.setenv("RECSYS_AWS_MLFLOW_SECRET_ARN", secret)
        else:
            mp.delenv("RECSYS_AWS_MLFLOW_SECRET_ARN", raising=False)
        try:
            from airflow.dag_processing.dagbag import DagBag
        except ImportError:  # older layout
            from airflow.models.dagbag import DagBag  # type: ignore[no-redef]
        bag = DagBag(dag_folder=str(DAGS))
    assert bag.import_errors == {}, bag.import_errors
    assert {"weekly_train", "daily_inference"} <= set(bag.dag_ids)
    return [t for dag in bag.dags.values() for t in dag.tasks]


def _needed(tasks: list[Any], values: dict[str, str] | None = None) -> dict[str, set[Need]]:
    from pipeline.orchestration.aws import required_actions

    return {role: {(a, _sub(r, values)) for a, r in pairs} for role, pairs in required_actions(tasks).items()}


def test_the_aws_dags_use_the_remote_operators(aws_tasks: list[Any]) -> None:
    from pipeline.orchestration.aws import RemoteEmrServerlessJobOperator, RemoteSageMakerTrainingOperator

    kinds = {type(t).__name__: t for t in aws_tasks}
    assert {"RemoteEmrServerlessJobOperator", "RemoteSageMakerTrainingOperator"} <= set(kinds), sorted(kinds)
    emr = sorted(t.kind for t in aws_tasks if isinstance(t, RemoteEmrServerlessJobOperator))
    assert emr == ["build_matrix", "infer"]
    assert sum(isinstance(t, RemoteSageMakerTrainingOperator) for t in aws_tasks) == 1


def test_the_remote_operators_get_the_staged_envelope(aws_tasks: list[Any]) -> None:
    """Each `<step>_run` waits for `<step>_stage`, survives DAG serialization, and renders the stage task's XCom
    (the envelope URI) into the job driver / container arguments."""
    from airflow.serialization.serialized_objects import DagSerialization

    uri = "s3://lake-b/_jobs/weekly_train/r/step/envelope.json"

    class _TI:
        def xcom_pull(self, *a: Any, **k: Any) -> str:
            return uri

    runs = [t for t in aws_tasks if t.task_id.endswith("_run")]
    assert sorted(t.task_id for t in runs) == ["build_matrix_run", "infer_run", "train_run"]
    for t in runs:
        assert t.upstream_task_ids == {t.task_id.removesuffix("_run") + "_stage"}, t.task_id
        assert DagSerialization.from_dict(DagSerialization.to_dict(t.dag)).get_task(t.task_id).task_id == t.task_id
        t.render_template_fields({"ti": _TI(), "task_instance": _TI(), "run_id": "r", "dag": t.dag, "task": t, "params": {}})
        args = (t.job_driver["sparkSubmit"]["entryPointArguments"] if t.task_id != "train_run"
                else t.config["AlgorithmSpecification"]["ContainerArguments"])
        assert t.envelope_uri == uri and args == [uri], t.task_id


def test_every_needed_action_is_granted_and_nothing_else(aws_tasks: list[Any], values: dict[str, str]) -> None:
    missing, extra = missing_and_extra(_needed(aws_tasks, values), granted(_template(), values))
    assert not missing, "infra/iam.yaml lacks what the tasks do:\n" + "\n".join(missing)
    assert not extra, "infra/iam.yaml grants what no task does (least privilege):\n" + "\n".join(extra)


def test_the_check_fails_for_a_new_task_a_lost_grant_or_an_extra_one(aws_tasks: list[Any], values: dict[str, str]) -> None:
    """The comparison can fail in each direction (so a green run means something)."""
    from types import SimpleNamespace

    from pipeline.orchestration.aws import required_actions

    with pytest.raises(KeyError, match=r"task 'export_to_crm' .* has no declared AWS needs"):
        required_actions([*aws_tasks, SimpleNamespace(task_id="export_to_crm")])
    need, grant = _needed(aws_tasks, values), granted(_template(), values)
    lost = {r: {g for g in gs if g[0] != "emr-serverless:StartJobRun"} for r, gs in grant.items()}
    assert missing_and_extra(need, lost)[0] == [
        "airflow: emr-serverless:StartJobRun on arn:aws:emr-serverless:eu-west-1:111122223333:/applications/*"]
    wider = {**grant, "inference": grant["inference"] | {("s3:GetObject", "arn:aws:s3:::lake-b/snapshots/*")}}
    assert missing_and_extra(need, wider)[1] == ["inference: s3:GetObject on arn:aws:s3:::lake-b/snapshots/*"]
    any_prefix = {**grant, "training": grant["training"] | {("s3:ListBucket", "arn:aws:s3:::lake-b#*")}}
    assert missing_and_extra(need, any_prefix)[1] == ["training: s3:ListBucket on arn:aws:s3:::lake-b#*"]


def test_each_job_role_reaches_only_its_own_areas(aws_tasks: list[Any], values: dict[str, str]) -> None:
    """Spot checks on the derived needs themselves (what the jobs declare), independent of the template."""
    need = _needed(aws_tasks, values)
    assert ("s3:PutObject", "arn:aws:s3:::lake-b/snapshots/*") in need["spark-build"]
    assert not any(r.startswith("arn:aws:s3:::recs-b") for _, r in need["spark-build"] | need["training"])
    assert ("s3:PutObject", "arn:aws:s3:::recs-b/recommendations/*") in need["inference"]
    assert not any(a.startswith(("emr-serverless:", "sagemaker:", "iam:")) for role in ("training", "spark-build", "inference")
                   for a, _ in need[role])
    assert ("iam:PassRole", "arn:aws:iam::111122223333:role/recsys-prod-training") in need["airflow"]
    assert all("events/" not in r for a, r in need["airflow"] if a.startswith("s3:"))  # Airflow never reads raw events


def test_the_mlflow_secret_is_read_by_the_jobs_that_use_mlflow_only(aws_tasks: list[Any], values: dict[str, str],
                                                                    secret: str | None) -> None:
    """The operators pass the secret's ARN to training and inference (not the build), so exactly their roles need it;
    a stack whose MlflowSecretArn disagrees with the profile fails the check, either way round."""
    from pipeline.orchestration.aws import mlflow_secret_passed

    passed = {t.task_id: mlflow_secret_passed(t) for t in aws_tasks if t.task_id.endswith("_run")}
    assert passed == {"build_matrix_run": None, "train_run": secret, "infer_run": secret}
    need = _needed(aws_tasks, values)
    readers = {role for role, pairs in need.items() for a, _ in pairs if a.startswith("secretsmanager:")}
    assert readers == ({"training", "inference"} if secret else set())
    if secret:
        assert ("secretsmanager:GetSecretValue", secret) in need["training"] & need["inference"]
    other = {**values, "MlflowSecretArn": "" if secret else MLFLOW_SECRET}  # the stack deployed the other way
    missing, extra = missing_and_extra(need, granted(_template(), other))
    wrong = [f"{role}: secretsmanager:GetSecretValue on {MLFLOW_SECRET}" for role in ("inference", "training")]
    assert (sorted(missing), sorted(extra)) == ((wrong, []) if secret else ([], wrong))
