# syntax=docker/dockerfile:1
# GPU training image: `recsys train` on a SageMaker GPU instance (ml.g5.*) or any host with the NVIDIA runtime.
# Build from the repository root:  docker build -f docker/train.Dockerfile -t recsys-train:<git-sha> .
#
# Base images are pinned by tag. Resolve and pin the digest when you first build
# (docker buildx imagetools inspect nvidia/cuda:12.8.1-base-ubuntu22.04) and write it as FROM image:tag@sha256:...
# The "base" CUDA flavour is enough: the torch CUDA wheels ship their own CUDA runtime, cuBLAS and cuDNN; the host's
# NVIDIA driver is injected by the container runtime.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu22.04
# The torch wheel index for a CUDA build of the pinned torch (must match the driver's CUDA major version).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128

FROM ${CUDA_IMAGE} AS build
ARG TORCH_INDEX
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Distro packages follow the pinned base image's security updates; pinning their versions would break on every update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first (cached layer while only the code changes): the CUDA torch, then the locked tree.
COPY requirements.lock ./
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==$(grep -E '^torch==' requirements.lock | cut -d= -f3)"
COPY pyproject.toml README.md ./
COPY model ./model
COPY pipeline ./pipeline
RUN pip install --no-cache-dir -c requirements.lock . \
    && python -c "import torch, pipeline.cli.main; assert torch.version.cuda, 'CPU torch was installed'"

FROM ${CUDA_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --create-home --shell /usr/sbin/nologin recsys
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    RECSYS_HOME=/home/recsys/.recsys
USER 10001
WORKDIR /home/recsys
# The `aws` profile's SageMaker training job (pipeline/orchestration/aws/operators.py training_job) overrides the
# entry point with ContainerEntrypoint ["python", "-m", "pipeline.orchestration.remote"] + ContainerArguments
# [<envelope URI>]: the venv's python (on PATH above) runs the staged TrainJob and writes its outcome (and
# /opt/ml/output/failure on an error).
# By hand: `docker run IMAGE train --snapshot ...` runs the CLI.
ENTRYPOINT ["recsys"]
CMD ["train", "--help"]
