# syntax=docker/dockerfile:1
# Airflow with the project installed (self-hosted Airflow: scheduler, dag-processor, api-server and workers all use it).
# Build from the repository root:  docker build -f docker/airflow.Dockerfile -t recsys-airflow:<git-sha> .
#
# Pinned by tag; pin the digest when you first build (docker buildx imagetools inspect apache/airflow:3.3.2-python3.11).
ARG AIRFLOW_IMAGE=apache/airflow:3.3.2-python3.11
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

FROM ${AIRFLOW_IMAGE}
ARG TORCH_INDEX
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
USER 0
# Java 17 for the Spark jobs that run in `local[*]` mode on a worker (clusters use EMR Serverless instead).
# Distro packages follow the pinned base image's security updates.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/*
ENV JAVA_HOME=/usr/lib/jvm/java-17-openjdk-amd64 \
    SPARK_LOCAL_IP=127.0.0.1
# Back to the image's own non-root user (airflow, uid 50000): pip installs into its environment, as the image's docs prescribe.
USER 50000
WORKDIR /opt/airflow/recsys
COPY --chown=airflow:root requirements.lock ./
# CPU torch: workers orchestrate and run light jobs; GPU training goes to SageMaker.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==$(grep -E '^torch==' requirements.lock | cut -d= -f3)"
COPY --chown=airflow:root pyproject.toml README.md ./
COPY --chown=airflow:root model ./model
COPY --chown=airflow:root pipeline ./pipeline
# The lock pins apache-airflow==3.3.2 too, so installing the project cannot move Airflow off the base image's version.
RUN pip install --no-cache-dir -c requirements.lock . \
    && python -c "import airflow, pipeline.cli.main; assert airflow.__version__ == '3.3.2', airflow.__version__" \
    && python -P -m model.topk
COPY --chown=airflow:root dags /opt/airflow/dags
WORKDIR /opt/airflow
