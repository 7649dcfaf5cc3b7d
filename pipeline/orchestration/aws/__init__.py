"""The `aws` execution profile: EMR Serverless runs the Spark jobs, a SageMaker training job trains on a GPU.

- profile.py: `AwsProfile`, the settings (RECSYS_AWS_*);
- naming.py: remote job names and idempotency tokens, one per try;
- polling.py: the provider's triggers polling through threaded boto3 (no aiobotocore);
- operators.py: the operators and their builders `emr_serverless_job`, `training_job`;
- iam.py: what the tasks do on AWS, from which infra/iam.yaml's policies derive (`required_actions`).

Every public name is re-exported here: callers use `aws.AwsProfile.from_env()`, `aws.training_job(...)`, and
triggers deferred under the old one-module layout (classpath `pipeline.orchestration.aws.<Trigger>`) still resolve.
"""

from pipeline.orchestration.aws.iam import (
    AREAS,
    JOB_DATA,
    JOB_ROLE,
    MLFLOW_SECRET_NEED,
    SERVICE_NEEDS,
    TASK_DATA,
    Need,
    Role,
    data_needs,
    required_actions,
    role_arn,
)
from pipeline.orchestration.aws.naming import client_token, remote_job_name
from pipeline.orchestration.aws.operators import (
    MLFLOW_KINDS,
    TRAINING_ENTRY,
    RemoteEmrServerlessJobOperator,
    RemoteSageMakerTrainingOperator,
    SparkKind,
    emr_serverless_job,
    mlflow_secret_passed,
    training_job,
)
from pipeline.orchestration.aws.polling import (
    EmrServerlessApplicationTrigger,
    EmrServerlessJobTrigger,
    SageMakerJobTrigger,
    ThreadedEmrServerlessHook,
    ThreadedSageMakerHook,
)
from pipeline.orchestration.aws.profile import ENV_PREFIX, AwsProfile

__all__ = [
    "AREAS",
    "ENV_PREFIX",
    "JOB_DATA",
    "JOB_ROLE",
    "MLFLOW_KINDS",
    "MLFLOW_SECRET_NEED",
    "SERVICE_NEEDS",
    "TASK_DATA",
    "TRAINING_ENTRY",
    "AwsProfile",
    "EmrServerlessApplicationTrigger",
    "EmrServerlessJobTrigger",
    "Need",
    "RemoteEmrServerlessJobOperator",
    "RemoteSageMakerTrainingOperator",
    "Role",
    "SageMakerJobTrigger",
    "SparkKind",
    "ThreadedEmrServerlessHook",
    "ThreadedSageMakerHook",
    "client_token",
    "data_needs",
    "emr_serverless_job",
    "mlflow_secret_passed",
    "remote_job_name",
    "required_actions",
    "role_arn",
    "training_job",
]
