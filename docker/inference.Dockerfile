# syntax=docker/dockerfile:1
# Batch inference image (CPU only, slim): `recsys infer --engine local` on an ECS/Fargate task or any container host.
# The Spark engine runs on EMR Serverless instead (its image must derive from the EMR Serverless Spark base).
# Build from the repository root:  docker build -f docker/inference.Dockerfile -t recsys-inference:<git-sha> .
#
# Pinned by tag; pin the digest when you first build (docker buildx imagetools inspect python:3.11.13-slim-bookworm).
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm
# CPU-only torch wheels (the default PyPI wheel carries CUDA libraries: gigabytes this image never uses).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY requirements.lock ./
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==$(grep -E '^torch==' requirements.lock | cut -d= -f3)"
COPY pyproject.toml README.md ./
COPY model ./model
COPY pipeline ./pipeline
# the numba top-k compiled for this CPU and for any AVX2 CPU, with a record of this one: the job loads the kernels
# that fit the CPU it lands on instead of compiling (pipeline/io/numba_target.py)
RUN pip install --no-cache-dir -c requirements.lock . \
    && python -c "import torch, pipeline.cli.main; assert torch.version.cuda is None" \
    && find /opt/venv -name '__pycache__' -prune -exec rm -rf {} + \
    && python -P -m pipeline.io.numba_target  # -P: the installed package, not ./model; its numba cache ships in the image

FROM ${PYTHON_IMAGE}
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin recsys
COPY --from=build /opt/venv /opt/venv
# numba ignores a cache directory it cannot write (and would compile the top-k again in every run): the user's own
COPY --from=build --chown=10001:10001 /opt/venv/lib/python3.11/site-packages/model/__pycache__ \
     /opt/venv/lib/python3.11/site-packages/model/__pycache__
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    RECSYS_HOME=/home/recsys/.recsys
USER 10001
WORKDIR /home/recsys
ENTRYPOINT ["recsys"]
CMD ["infer", "--help"]
