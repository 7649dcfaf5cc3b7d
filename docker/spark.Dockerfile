# syntax=docker/dockerfile:1
# EMR Serverless image of the Spark jobs (matrix build, Spark inference engine) in the `aws` profile: the EMR
# Serverless Spark base of the compute stack's release (EmrReleaseLabel emr-spark-8.0.0: Apache Spark 4.0.2, Python
# 3.11) with the project in its own venv, /opt/recsys. Spark and pyspark are EMR's: the venv holds neither pyspark (a
# pip pyspark would shadow EMR's build of the JVM side) nor Airflow. `make test` runs both jobs on Apache Spark 4.0.2
# (tests/pipeline/orchestration/test_emr_spark_release.py).
# Build from the repository root:  docker build -f docker/spark.Dockerfile -t recsys-spark:<git-sha> .
# Push it to the SparkImageRepository, set the compute stack's SparkImageUri to it; the profile's defaults then match:
#   RECSYS_AWS_EMR_ENTRY_POINT=local:///opt/recsys/lib/python3.11/site-packages/pipeline/orchestration/remote.py
#   RECSYS_AWS_EMR_PYTHON=/opt/recsys/bin/python  (the operators set PYSPARK_PYTHON of driver and executors to it)
#
# Pinned by a dated tag, the form AWS publishes release images under (e.g. emr-7.9.0:20250425) besides `latest`.
# This tag was NOT verified (no registry access where it was written): on first build list the release's tags in
# the ECR Public Gallery, then pin tag and digest (docker buildx imagetools inspect <image>).
ARG EMR_IMAGE=public.ecr.aws/emr-serverless/spark/emr-spark-8.0.0:20260521
# CPU-only torch: EMR Serverless workers have no GPU (training runs on SageMaker).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

FROM ${EMR_IMAGE}
ARG TORCH_INDEX
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
USER 0
# The release ships Python 3.11; the distro package is the fallback and follows the base image's updates.
# hadolint ignore=DL3041
RUN (command -v python3.11 >/dev/null || dnf install -y python3.11) \
    && dnf clean all \
    && python3.11 -m venv /opt/recsys
WORKDIR /tmp/recsys-build
# Dependencies first (cached layer while only the code changes): the CPU torch, then the project's pins but pyspark
# and Airflow, constrained by the lock.
COPY requirements.lock pyproject.toml README.md docker/image_requirements.py ./
RUN /opt/recsys/bin/pip install --no-cache-dir --index-url "${TORCH_INDEX}" \
        "torch==$(grep -E '^torch==' requirements.lock | cut -d= -f3)" \
    && /opt/recsys/bin/python image_requirements.py --without pyspark --without 'apache-airflow*' > runtime.txt \
    && /opt/recsys/bin/pip install --no-cache-dir -c requirements.lock -r runtime.txt
COPY model ./model
COPY pipeline ./pipeline
# --no-deps: the dependencies are in; pyspark and Airflow stay out. The numba top-k is compiled here, for this CPU
# and for any AVX2 CPU (pipeline/io/numba_target.py), and its cache is handed to the job user (numba ignores a
# cache directory it cannot write, and would compile in every worker).
RUN /opt/recsys/bin/pip install --no-cache-dir --no-deps . \
    && /opt/recsys/bin/python -P -c "import importlib.util as u, torch, pipeline.orchestration.remote; \
assert torch.version.cuda is None; assert u.find_spec('pyspark') is None and u.find_spec('airflow') is None" \
    && find /opt/recsys -name '__pycache__' -prune -exec rm -rf {} + \
    && /opt/recsys/bin/python -P -m pipeline.io.numba_target \
    && chown -R hadoop:hadoop /opt/recsys/lib/python3.11/site-packages/model/__pycache__ \
    && rm -rf /tmp/recsys-build
WORKDIR /home/hadoop
# EMR Serverless's rule for custom images: end as its hadoop user, by name
# hadolint ignore=DL3066
USER hadoop:hadoop
