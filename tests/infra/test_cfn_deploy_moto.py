"""Deploy infra/storage.yaml and infra/iam.yaml with CloudFormation into a moto server on 127.0.0.1 (never real AWS).

moto's CloudFormation creates AWS::S3::Bucket with BucketEncryption and Tags only, and skips AWS::S3::BucketPolicy
(it warns "No Moto CloudFormation support"). So after create_stack the test applies the template's remaining bucket
properties (versioning, public access block, lifecycle, TLS-only policy) through the S3 API, translated the way
CloudFormation does; that checks the template's values are ones S3 accepts and that they say what we require.
compute.yaml (MWAA, EMR Serverless) is not supported by moto: cfn-lint and checkov cover it.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import re
from typing import Any

import boto3
import pytest
from cfnlint.decode import decode
from infra_support import INFRA

# moto warns about the resource types it skips (the module docstring says how the test makes up for them).
pytestmark = pytest.mark.filterwarnings("ignore:Tried to parse .* not supported by moto:UserWarning")

ACCOUNT = "123456789012"  # moto's account
PARAMS = {"Project": "recsys", "Environment": "dev"}
MLFLOW_SECRET = f"arn:aws:secretsmanager:us-east-1:{ACCOUNT}:secret:recsys/staging/mlflow-AbC123"


def _template(name: str) -> dict[str, Any]:
    tpl, errors = decode(str(INFRA / name))
    assert not errors, errors
    return tpl


def _resolve(node: Any, refs: dict[str, str]) -> Any:
    """The few intrinsics the storage template's bucket properties use: Ref, Fn::Sub (string), Fn::GetAtt X.Arn."""
    if isinstance(node, dict):
        if set(node) == {"Ref"}:
            return refs[node["Ref"]]
        if set(node) == {"Fn::Sub"}:
            return re.sub(r"\$\{([^}]+)\}", lambda m: refs[m.group(1)], node["Fn::Sub"])
        if set(node) == {"Fn::GetAtt"}:
            return refs[".".join(node["Fn::GetAtt"])]
        return {k: _resolve(v, refs) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, refs) for v in node]
    return node


def _lifecycle_rule(rule: dict[str, Any]) -> dict[str, Any]:
    """CloudFormation's LifecycleConfiguration rule -> the S3 API's shape."""
    out: dict[str, Any] = {"ID": rule["Id"], "Status": rule["Status"], "Filter": {"Prefix": rule.get("Prefix", "")}}
    if "ExpirationInDays" in rule:
        out["Expiration"] = {"Days": int(rule["ExpirationInDays"])}
    if "Transitions" in rule:
        out["Transitions"] = [{"Days": int(t["TransitionInDays"]), "StorageClass": t["StorageClass"]}
                              for t in rule["Transitions"]]
    if "NoncurrentVersionExpiration" in rule:
        out["NoncurrentVersionExpiration"] = {"NoncurrentDays": int(rule["NoncurrentVersionExpiration"]["NoncurrentDays"])}
    if "AbortIncompleteMultipartUpload" in rule:
        out["AbortIncompleteMultipartUpload"] = {
            "DaysAfterInitiation": int(rule["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"])}
    return out


def _deploy(cf: Any, name: str, template: str, params: dict[str, str]) -> dict[str, str]:
    cf.create_stack(StackName=name, TemplateBody=(INFRA / template).read_text(),
                    Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in params.items()],
                    Capabilities=["CAPABILITY_NAMED_IAM"])
    stack = cf.describe_stacks(StackName=name)["Stacks"][0]
    assert stack["StackStatus"] == "CREATE_COMPLETE", stack.get("StackStatusReason")
    return {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}


def _allowed(statements: list[dict[str, Any]], action: str, arn: str) -> bool:
    """Does any Allow statement match (action, resource)? Conditions are ignored: an upper bound on what is granted."""
    for st in statements:
        if st["Effect"] != "Allow" or "NotResource" in st:
            continue
        actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        resources = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
        if any(fnmatch.fnmatchcase(action, a) for a in actions) and any(fnmatch.fnmatchcase(arn, r) for r in resources):
            return True
    return False


@pytest.fixture(scope="module")
def deployed(moto_endpoint_module: str) -> dict[str, Any]:
    """Both stacks, deployed once for the module (create_stack takes seconds)."""
    kw = {"endpoint_url": moto_endpoint_module, "region_name": "us-east-1"}
    cf, s3, iam = boto3.client("cloudformation", **kw), boto3.client("s3", **kw), boto3.client("iam", **kw)
    storage = _deploy(cf, "recsys-dev-storage", "storage.yaml", PARAMS)
    buckets = {"DataLakeBucket": storage["DataLakeBucketName"], "ArtifactsBucket": storage["ArtifactsBucketName"],
               "RecommendationsBucket": storage["RecommendationsBucketName"], "AirflowBucket": storage["AirflowBucketName"]}
    iam_out = _deploy(cf, "recsys-dev-iam", "iam.yaml", {**PARAMS, **buckets})  # MlflowSecretArn left empty
    # a second environment whose MLflow server needs credentials: its roles are recsys-staging-*
    _deploy(cf, "recsys-staging-iam", "iam.yaml", {**PARAMS, **buckets, "Environment": "staging",
                                                   "MlflowSecretArn": MLFLOW_SECRET})
    return {"s3": s3, "iam": iam, "cf": cf, "storage": storage, "iam_out": iam_out}


def test_storage_buckets(deployed: dict[str, Any]) -> None:
    s3, storage = deployed["s3"], deployed["storage"]
    tpl = _template("storage.yaml")
    buckets = {k: v for k, v in tpl["Resources"].items() if v["Type"] == "AWS::S3::Bucket"}
    names = {b["Name"] for b in s3.list_buckets()["Buckets"]}
    assert names == {
        f"recsys-dev-lake-{ACCOUNT}", f"recsys-dev-mlflow-{ACCOUNT}", f"recsys-dev-recs-{ACCOUNT}",
        f"airflow-recsys-dev-{ACCOUNT}", f"recsys-dev-access-logs-{ACCOUNT}"}
    assert storage["RecommendationsRoot"] == f"s3://recsys-dev-recs-{ACCOUNT}"

    physical = {r["LogicalResourceId"]: r["PhysicalResourceId"]
                for r in deployed["cf"].list_stack_resources(StackName="recsys-dev-storage")["StackResourceSummaries"]}
    refs = {"AWS::AccountId": ACCOUNT, "AWS::Region": "us-east-1", "AWS::Partition": "aws", **PARAMS,
            **{k: str(v["Default"]) for k, v in tpl["Parameters"].items() if k not in PARAMS}}
    for logical in buckets:
        refs[logical] = physical[logical]
        refs[f"{logical}.Arn"] = f"arn:aws:s3:::{physical[logical]}"

    policies = {_resolve(v["Properties"]["Bucket"], refs): _resolve(v["Properties"]["PolicyDocument"], refs)
                for v in tpl["Resources"].values() if v["Type"] == "AWS::S3::BucketPolicy"}
    for logical, res in buckets.items():
        name, props = physical[logical], _resolve(res["Properties"], refs)
        # Encryption: applied by moto's CloudFormation itself.
        rules = s3.get_bucket_encryption(Bucket=name)["ServerSideEncryptionConfiguration"]["Rules"]
        assert rules[0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] in {"AES256", "aws:kms"}, name
        # What moto's CloudFormation skips, applied through the S3 API from the template's own values.
        s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": props["VersioningConfiguration"]["Status"]})
        s3.put_public_access_block(Bucket=name, PublicAccessBlockConfiguration=props["PublicAccessBlockConfiguration"])
        s3.put_bucket_lifecycle_configuration(
            Bucket=name, LifecycleConfiguration={"Rules": [_lifecycle_rule(r) for r in props["LifecycleConfiguration"]["Rules"]]})
        s3.put_bucket_policy(Bucket=name, Policy=json.dumps(policies[name]))

        assert s3.get_bucket_versioning(Bucket=name)["Status"] == "Enabled", name
        pab = s3.get_public_access_block(Bucket=name)["PublicAccessBlockConfiguration"]
        assert pab == {"BlockPublicAcls": True, "IgnorePublicAcls": True, "BlockPublicPolicy": True,
                       "RestrictPublicBuckets": True}, name
        lc = s3.get_bucket_lifecycle_configuration(Bucket=name)["Rules"]
        assert any(r.get("AbortIncompleteMultipartUpload") for r in lc), name
        assert any(r.get("NoncurrentVersionExpiration") for r in lc), name
        policy = json.loads(s3.get_bucket_policy(Bucket=name)["Policy"])
        tls = [st for st in policy["Statement"] if st.get("Sid") == "DenyInsecureTransport"]
        assert tls and tls[0]["Effect"] == "Deny" and tls[0]["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}, name
        assert f"arn:aws:s3:::{name}/*" in tls[0]["Resource"], name
        if logical != "AccessLogsBucket":
            assert props["LoggingConfiguration"]["DestinationBucketName"] == f"recsys-dev-access-logs-{ACCOUNT}", name

    lake_rules = {r["ID"]: r for r in s3.get_bucket_lifecycle_configuration(Bucket=f"recsys-dev-lake-{ACCOUNT}")["Rules"]}
    assert lake_rules["events-tiering-and-retention"]["Expiration"]["Days"] == 400
    recs_rules = {r["ID"]: r for r in s3.get_bucket_lifecycle_configuration(Bucket=f"recsys-dev-recs-{ACCOUNT}")["Rules"]}
    # the recommendations are a Delta table: an expiry by age would delete its log and live files (the daily job's
    # retention drops old dates with a commit and vacuums instead)
    assert not any("Expiration" in r and r.get("Filter", {}).get("Prefix", r.get("Prefix", "")) in ("", "recommendations/")
                   for r in recs_rules.values()), recs_rules


ROLES = {"training": "sagemaker.amazonaws.com", "spark-build": "emr-serverless.amazonaws.com",
         "inference": "emr-serverless.amazonaws.com", "airflow": "airflow.amazonaws.com"}


def _doc(doc: Any) -> dict[str, Any]:
    if isinstance(doc, dict):
        return doc
    try:
        return json.loads(doc)
    except json.JSONDecodeError:  # moto 5.2 stores CloudFormation-created inline policies as a Python repr
        return ast.literal_eval(doc)


def _statements(iam: Any, role: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for pname in iam.list_role_policies(RoleName=role)["PolicyNames"]:
        # moto keeps a statement that resolved to AWS::NoValue (an !If whose condition is false) as null, where
        # CloudFormation drops it from the list: drop it here too
        out.extend(st for st in _doc(iam.get_role_policy(RoleName=role, PolicyName=pname)["PolicyDocument"])["Statement"]
                   if st is not None)
    return out


def test_roles_exist_with_trust_and_outputs(deployed: dict[str, Any]) -> None:
    iam, out = deployed["iam"], deployed["iam_out"]
    for suffix, service in ROLES.items():
        role = iam.get_role(RoleName=f"recsys-dev-{suffix}")["Role"]
        trust = _doc(role["AssumeRolePolicyDocument"])
        principals = trust["Statement"][0]["Principal"]["Service"]
        assert service in (principals if isinstance(principals, list) else [principals])
        assert trust["Statement"][0]["Condition"]["StringEquals"]["aws:SourceAccount"] == ACCOUNT
        assert _statements(iam, role["RoleName"]), f"{suffix} has no inline policy"
    assert out["TrainingRoleArn"] == f"arn:aws:iam::{ACCOUNT}:role/recsys-dev-training"
    assert out["AirflowExecutionRoleArn"].endswith(":role/recsys-dev-airflow")


LAKE, ART, RECS = (f"arn:aws:s3:::recsys-dev-{b}-{ACCOUNT}" for b in ("lake", "mlflow", "recs"))
# (role, action, resource, allowed?): each role gets its prefixes and nothing else.
MATRIX = [
    ("training", "s3:GetObject", f"{LAKE}/snapshots/as_of=2024-01-07/manifest.json", True),
    ("training", "s3:GetObject", f"{LAKE}/events/dt=2024-01-07/part-0.parquet", False),
    ("training", "s3:PutObject", f"{ART}/mlflow/1/abc/artifacts/model.pt", True),
    ("training", "s3:PutObject", f"{LAKE}/snapshots/x", False),
    ("training", "s3:PutObject", f"{RECS}/recommendations/dt=2024-01-07/part-0.parquet", False),
    ("training", "s3:DeleteObject", f"{ART}/mlflow/1/abc/artifacts/model.pt", False),
    ("spark-build", "s3:GetObject", f"{LAKE}/events/dt=2024-01-07/part-0.parquet", True),
    ("spark-build", "s3:PutObject", f"{LAKE}/snapshots/as_of=2024-01-07/manifest.json", True),
    ("spark-build", "s3:PutObject", f"{LAKE}/events/dt=2024-01-07/part-0.parquet", False),
    ("spark-build", "s3:GetObject", f"{ART}/mlflow/1/abc/artifacts/model.pt", False),
    ("inference", "s3:GetObject", f"{ART}/mlflow/1/abc/artifacts/model.pt", True),
    ("inference", "s3:PutObject", f"{RECS}/recommendations/dt=2024-01-07/part-0.parquet", True),
    ("inference", "s3:DeleteObject", f"{RECS}/recommendations/dt=2024-01-07/part-0.parquet", True),
    ("inference", "s3:PutObject", f"{ART}/mlflow/1/abc/artifacts/model.pt", False),
    ("inference", "s3:PutObject", f"{LAKE}/snapshots/x", False),
    ("inference", "s3:GetObject", f"{LAKE}/snapshots/as_of=2024-01-07/train.parquet", False),
    ("airflow", "s3:GetObject", f"{RECS}/recommendations/dt=2024-01-07/_SUCCESS", False),  # no task reads it (test_iam_derived)
    ("airflow", "s3:GetObject", f"{RECS}/recommendations/dt=2024-01-07/part-0.parquet", False),
    ("airflow", "s3:GetObject", f"{LAKE}/snapshots/as_of=2024-01-07/manifest.json", True),
    ("airflow", "s3:GetObject", f"{LAKE}/events/dt=2024-01-07/part-0.parquet", False),
    ("airflow", "s3:PutObject", f"{ART}/ledger/promotions.jsonl", True),
    ("airflow", "s3:PutObject", f"{ART}/mlflow/1/abc/artifacts/model.pt", False),
    ("airflow", "sagemaker:CreateTrainingJob", f"arn:aws:sagemaker:us-east-1:{ACCOUNT}:training-job/recsys-weekly-1", True),
    ("airflow", "sagemaker:CreateTrainingJob", f"arn:aws:sagemaker:us-east-1:{ACCOUNT}:training-job/other-team-job", False),
    ("airflow", "iam:PassRole", f"arn:aws:iam::{ACCOUNT}:role/recsys-dev-training", True),
    ("airflow", "iam:PassRole", f"arn:aws:iam::{ACCOUNT}:role/admin", False),
]


MATRIX_IDS = [f"{i}-{r}-{a}-{'allow' if e else 'deny'}" for i, (r, a, _, e) in enumerate(MATRIX)]


@pytest.mark.parametrize("role,action,arn,expected", MATRIX, ids=MATRIX_IDS)
def test_least_privilege(deployed: dict[str, Any], role: str, action: str, arn: str, expected: bool) -> None:
    assert _allowed(_statements(deployed["iam"], f"recsys-dev-{role}"), action, arn) is expected


def test_no_wildcard_grants(deployed: dict[str, Any]) -> None:
    """No role may Allow `*` or `service:*`; a `Resource: "*"` only for actions that have no resource-level permissions."""
    resource_star_ok = {"ecr:GetAuthorizationToken", "cloudwatch:PutMetricData", "logs:DescribeLogGroups",
                        "s3:GetAccountPublicAccessBlock"}
    for suffix in ROLES:
        for st in _statements(deployed["iam"], f"recsys-dev-{suffix}"):
            actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
            assert all(a != "*" and not a.endswith(":*") for a in actions), (suffix, st)
            if st.get("Resource") == "*":
                assert set(actions) <= resource_star_ok, (suffix, st)


def test_only_the_jobs_that_use_mlflow_read_its_secret_and_only_when_it_is_set(deployed: dict[str, Any]) -> None:
    """MlflowSecretArn set: training and inference may read exactly that secret; empty (dev): no role reads any."""
    iam, other = deployed["iam"], MLFLOW_SECRET.replace("recsys/staging/mlflow-AbC123", "prod/db-XyZ789")
    for suffix in ROLES:
        staging = _statements(iam, f"recsys-staging-{suffix}")
        assert _allowed(staging, "secretsmanager:GetSecretValue", MLFLOW_SECRET) is (suffix in ("training", "inference"))
        assert not _allowed(staging, "secretsmanager:GetSecretValue", other), suffix
        assert not any("secretsmanager" in str(st["Action"]) for st in _statements(iam, f"recsys-dev-{suffix}")), suffix
