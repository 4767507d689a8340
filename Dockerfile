# syntax=docker/dockerfile:1.7
# k2serve images, one target per role (build commands: docs/deploy.md):
#   worker   ghcr.io/k2serve/k2serve:0.1.0           CUDA, torch + triton, Ray; runs Ray head/workers, the pool
#                                                     controller, the model download Job (the K2Deployment default)
#   router   ghcr.io/k2serve/k2serve-router:0.1.0    the router (spec.router.image)
#   operator ghcr.io/k2serve/k2serve-operator:0.1.0  the kopf operator (the Helm chart's default)
# Requirement strings below are pyproject.toml's, verbatim: tests/test_dockerfile.py keeps them so.

ARG K2SERVE_VERSION=0.1.0
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# The project as one wheel (no dependencies); every role installs it.
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY k2serve k2serve
COPY operator operator
COPY worker worker
COPY router router
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE} AS slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --uid 1000 --user-group --create-home k2serve

FROM slim AS operator
RUN pip install "kopf>=1.37" "kubernetes>=30" "pydantic>=2.6" "pyyaml>=6" "prometheus_client>=0.20"
RUN --mount=from=wheel,source=/wheels,target=/wheels pip install --no-deps /wheels/k2serve-*.whl
USER 1000:1000
WORKDIR /home/k2serve
ENTRYPOINT ["k2serve", "operator"]

FROM slim AS router
# The router imports no torch (tests/router/test_router_process.py): this image has none.
RUN pip install "ray>=2.40" "grpcio>=1.85.1" "protobuf>=7.35.1,<8" "prometheus_client>=0.20" "pydantic>=2.6" \
    "safetensors>=0.4" "tiktoken>=0.7" "jinja2>=3.1" "pyyaml>=6" "fastapi>=0.110" "uvicorn>=0.29" \
    "httpx>=0.27" "redis>=5" "tqdm>=4.60"
RUN --mount=from=wheel,source=/wheels,target=/wheels pip install --no-deps /wheels/k2serve-*.whl
USER 1000:1000
WORKDIR /home/k2serve
ENTRYPOINT ["python", "-m", "k2serve.router.process"]

# Last, so a plain `docker build .` builds it.
FROM ${CUDA_IMAGE} AS worker
ARG K2SERVE_VERSION
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
# gcc and the Python headers: Triton compiles its kernel launchers with them at run time.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && (userdel --remove ubuntu 2>/dev/null || true) \
    && useradd --uid 1000 --user-group --create-home k2serve
RUN pip install --index-url https://download.pytorch.org/whl/cu128 "torch>=2.4,<2.15"
# The project with every runtime dependency of pyproject.toml plus the `cluster` extra (ray[default] for KubeRay).
RUN --mount=from=wheel,source=/wheels,target=/wheels \
    pip install "/wheels/k2serve-${K2SERVE_VERSION}-py3-none-any.whl[cluster]"
USER 1000:1000
WORKDIR /home/k2serve
