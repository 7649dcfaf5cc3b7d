"""What the `aws` profile's tasks do on AWS: the IAM policies derive from this (tests/infra/test_iam_derived.py).

`required_actions` maps the DAGs' tasks to the (action, resource) pairs each role needs; infra/iam.yaml must grant
exactly these, nothing more: the test checks both directions.

Resources are written as in infra/iam.yaml's !Sub strings (same ${...} names), so the test resolves both alike.
`s3:ListBucket` is a bucket ARN plus `#<prefix>`: the policy's s3:prefix condition. A leading `!` is NotResource.
The MLflow credentials' secret (`${MlflowSecretArn}`) is needed by a job role only when its operator hands the job
that secret (AwsProfile.mlflow_secret_arn set), as infra/iam.yaml grants it only when its MlflowSecretArn is set.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Literal

from pipeline.orchestration.aws.operators import (
    RemoteEmrServerlessJobOperator,
    RemoteSageMakerTrainingOperator,
    SparkKind,
    mlflow_secret_passed,
)

Role = Literal["airflow", "spark-build", "inference", "training"]
Need = tuple[str, str]  # (action, resource)

_ARN = "arn:${AWS::Partition}"
_LOGS = f"{_ARN}:logs:${{AWS::Region}}:${{AWS::AccountId}}:log-group:"
AREAS: dict[str, tuple[str, str]] = {  # lake area -> (bucket, key prefix)
    "events": ("${DataLakeBucket}", "events"),
    "snapshots": ("${DataLakeBucket}", "snapshots"),
    "staging": ("${DataLakeBucket}", "_jobs"),  # RECSYS_STAGING_URI's default: <lake>/_jobs (envelopes, outcomes)
    "recommendations": ("${RecommendationsBucket}", "recommendations"),
    "mlflow": ("${ArtifactsBucket}", "mlflow"),
    "ledger": ("${ArtifactsBucket}", "ledger"),
    "emr_logs": ("${ArtifactsBucket}", "emr-logs"),
    "sagemaker_output": ("${ArtifactsBucket}", "sagemaker-output"),
}
# L list the prefix, R read, W write, M abort a multipart write, D delete
_S3_ACTIONS = {"L": "s3:ListBucket", "R": "s3:GetObject", "W": "s3:PutObject", "M": "s3:AbortMultipartUpload",
               "D": "s3:DeleteObject"}

# What each job does to the lake, from its code. It runs remotely under its job role (JOB_ROLE), and every remote
# job reads its envelope and replaces its outcome in the staging area (remote.execute).
_STAGED = {"staging": "LRWMD"}
JOB_DATA: dict[str, dict[str, str]] = {
    "build_matrix": {"events": "LR", "snapshots": "LRWMD", **_STAGED},  # D: a failed build removes its temporary run
    "train": {"snapshots": "LR", "mlflow": "LRWM", **_STAGED},
    "infer": {"events": "LR", "mlflow": "LR", "recommendations": "LRWMD", **_STAGED},  # D: a re-run replaces its date
}
JOB_ROLE: dict[str, Role] = {"build_matrix": "spark-build", "infer": "inference", "train": "training"}

# The DAGs' Python tasks (they run on the Airflow worker, as the Airflow role) and what they do to the lake.
# A task id missing here fails tests/infra/test_iam_derived.py: declare what a new task does, then grant it.
TASK_DATA: dict[str, dict[str, str]] = {
    "build_matrix_stage": _STAGED, "train_stage": _STAGED, "infer_stage": _STAGED,  # remote.stage
    "build_matrix": {"staging": "LR"}, "train": {"staging": "LR"}, "infer": {"staging": "LR"},  # remote.collect
    # the gate scores candidate, champion and baselines on the snapshot's test users and keeps the ledger
    "gate_and_promote": {"snapshots": "LR", "mlflow": "LR", "ledger": "LRW"},
    "champion_exists": {}, "champion_moved": {},  # the MLflow registry (HTTP) only; nothing on S3
}

_EMR_APPS = f"{_ARN}:emr-serverless:${{AWS::Region}}:${{AWS::AccountId}}:/applications/*"
_TRAINING_JOBS = f"{_ARN}:sagemaker:${{AWS::Region}}:${{AWS::AccountId}}:training-job/${{Project}}-*"
_TRAIN_REPO = f"{_ARN}:ecr:${{AWS::Region}}:${{AWS::AccountId}}:repository/${{Project}}-train"
_SAGEMAKER_LOGS = f"{_LOGS}/aws/sagemaker/TrainingJobs:*"
# remote.load_mlflow_credentials reads the secret the operator names, with the job's role
MLFLOW_SECRET_NEED: Need = ("secretsmanager:GetSecretValue", "${MlflowSecretArn}")


def role_arn(role: Role) -> str:
    """A job role's ARN as infra/iam.yaml names it."""
    return f"{_ARN}:iam::${{AWS::AccountId}}:role/${{Project}}-${{Environment}}-{role}"


# The operators' own API calls (as the Airflow role), beside what their job does.
def _emr_operator_needs(kind: SparkKind) -> set[Need]:
    calls = {"emr-serverless:GetApplication", "emr-serverless:StartApplication",  # started if auto-stopped
             "emr-serverless:StartJobRun", "emr-serverless:TagResource",  # the job run's project tag
             "emr-serverless:GetJobRun",  # the trigger's polling, the failure's details
             "emr-serverless:CancelJobRun"}  # on kill, and when the wait times out
    role = role_arn(JOB_ROLE[kind])
    return {(a, _EMR_APPS) for a in calls} | {("iam:PassRole", role), ("iam:GetRole", role)}  # GetRole: preflight


def _sagemaker_operator_needs() -> set[Need]:
    calls = {"sagemaker:CreateTrainingJob", "sagemaker:AddTags",  # the job's project tag
             "sagemaker:DescribeTrainingJob",  # exists-check, the trigger's polling, the result
             "sagemaker:StopTrainingJob"}  # on kill, and when the wait times out
    role = role_arn("training")
    return ({(a, _TRAINING_JOBS) for a in calls}
            | {("iam:PassRole", role), ("iam:GetRole", role), ("ecr:DescribeImages", _TRAIN_REPO)}  # preflight
            | {("logs:DescribeLogStreams", _SAGEMAKER_LOGS), ("logs:GetLogEvents", _SAGEMAKER_LOGS)})  # print_log


# What the services themselves do with a role, whatever the job: documented by AWS for each service.
SERVICE_NEEDS: dict[Role, set[Need]] = {
    "training": {  # SageMaker pulls the image, writes the job's log, metrics and its output with the job's role
        ("ecr:BatchGetImage", _TRAIN_REPO), ("ecr:GetDownloadUrlForLayer", _TRAIN_REPO),
        ("ecr:BatchCheckLayerAvailability", _TRAIN_REPO), ("ecr:GetAuthorizationToken", "*"),
        *((a, _SAGEMAKER_LOGS) for a in ("logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents",
                                        "logs:DescribeLogStreams")),
        ("cloudwatch:PutMetricData", "*"),
        *((_S3_ACTIONS[c], f"{_ARN}:s3:::${{ArtifactsBucket}}/sagemaker-output/*") for c in "WM"),
    },
    **{role: {  # EMR Serverless writes the driver/executor logs: S3 (the job's logUri) and the application's log group
        (_S3_ACTIONS["W"], f"{_ARN}:s3:::${{ArtifactsBucket}}/emr-logs/*"),
        *((a, f"{_LOGS}/${{Project}}/${{Environment}}/emr-serverless:*")
          for a in ("logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams")),
        ("logs:DescribeLogGroups", f"{_LOGS}*"),
    } for role in ("spark-build", "inference")},
    "airflow": {  # MWAA's own runtime (AWS's execution-role policy for MWAA): DAGs, its logs, metrics, Celery queue
        ("airflow:PublishMetrics", f"{_ARN}:airflow:${{AWS::Region}}:${{AWS::AccountId}}:environment/${{MwaaEnvironmentName}}"),
        *((a, r) for a in ("s3:GetObject*", "s3:GetBucket*", "s3:List*")
          for r in (f"{_ARN}:s3:::${{AirflowBucket}}", f"{_ARN}:s3:::${{AirflowBucket}}/*")),
        ("s3:GetAccountPublicAccessBlock", "*"),
        *((a, f"{_LOGS}airflow-${{MwaaEnvironmentName}}-*")
          for a in ("logs:CreateLogStream", "logs:CreateLogGroup", "logs:PutLogEvents", "logs:GetLogEvents",
                    "logs:GetLogRecord", "logs:GetLogGroupFields", "logs:GetQueryResults")),
        ("logs:DescribeLogGroups", "*"), ("cloudwatch:PutMetricData", "*"),
        *((a, f"{_ARN}:sqs:${{AWS::Region}}:*:airflow-celery-*")
          for a in ("sqs:ChangeMessageVisibility", "sqs:DeleteMessage", "sqs:GetQueueAttributes", "sqs:GetQueueUrl",
                    "sqs:ReceiveMessage", "sqs:SendMessage")),
        *((a, f"!{_ARN}:kms:*:${{AWS::AccountId}}:key/*")  # the AWS-owned SQS key only
          for a in ("kms:Decrypt", "kms:DescribeKey", "kms:GenerateDataKey*", "kms:Encrypt")),
    },
}


def data_needs(areas: Mapping[str, str]) -> set[Need]:
    """The S3 (action, resource) pairs of `{area: access letters}`."""
    out: set[Need] = set()
    for area, access in areas.items():
        bucket, prefix = AREAS[area]
        for c in access:
            res = f"{_ARN}:s3:::{bucket}#{prefix}/*" if c == "L" else f"{_ARN}:s3:::{bucket}/{prefix}/*"
            out.add((_S3_ACTIONS[c], res))
    return out


def required_actions(tasks: Iterator[Any] | list[Any]) -> dict[Role, set[Need]]:
    """What each role must be allowed, derived from the DAGs' tasks: each operator's API calls and its job's data
    (under the job's role), each Python task's data (under the Airflow role), and each service's own needs.
    Raises KeyError naming a task whose needs are not declared here."""
    roles: tuple[Role, ...] = ("airflow", "spark-build", "inference", "training")
    need: dict[Role, set[Need]] = {r: set(SERVICE_NEEDS.get(r, set())) for r in roles}
    for t in tasks:
        if isinstance(t, RemoteEmrServerlessJobOperator):
            need["airflow"] |= _emr_operator_needs(t.kind)
            need[JOB_ROLE[t.kind]] |= data_needs(JOB_DATA[t.kind])
            if mlflow_secret_passed(t):
                need[JOB_ROLE[t.kind]].add(MLFLOW_SECRET_NEED)
        elif isinstance(t, RemoteSageMakerTrainingOperator):
            need["airflow"] |= _sagemaker_operator_needs()
            need["training"] |= data_needs(JOB_DATA["train"])
            if mlflow_secret_passed(t):
                need["training"].add(MLFLOW_SECRET_NEED)
        elif t.task_id in TASK_DATA:
            need["airflow"] |= data_needs(TASK_DATA[t.task_id])
        else:
            raise KeyError(f"task {t.task_id!r} ({type(t).__name__}) has no declared AWS needs: add it to "
                           "pipeline/orchestration/aws/iam.py TASK_DATA (or its operator's needs), then grant them in "
                           "infra/iam.yaml")
    return need
