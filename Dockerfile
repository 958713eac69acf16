# syntax=docker/dockerfile:1
# detseg front end: `detseg serve` (also the image of the chart's `detseg export` init container).
#   docker build -t detseg:0.1.0 .
#   docker run --rm -p 50051:50051 detseg:0.1.0 --models demo-open --offline
# Multi-stage: the builder generates the gRPC code and installs `.[triton]` into /opt/venv; the runtime copies
# only that venv onto a fresh python:3.11-slim and runs as the non-root user 10001. Settings come from
# DETSEG_<NAME> environment variables (service/config.py); health is for Kubernetes' grpc probes (no HEALTHCHECK).
# python:3.11-slim on a named Debian release, so the apt package names below stay valid.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
# torch comes from PyTorch's CPU index by default: the front end runs no model on a GPU with backend triton
# (Triton does), and the CUDA wheels would add gigabytes. Build with --build-arg TORCH_INDEX_URL= for PyPI's.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# Versions: the base image's Debian release fixes the apt packages'; pyproject.toml pins the Python ones.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY service ./service
# 1. The dependencies (grpcio-tools among them, at its pinned version); 2. the gRPC code, generated as
# `make proto` does (it is not committed); 3. detseg itself again, now with that code.
# hadolint ignore=DL3013
RUN pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} ".[triton]" \
    && rm -rf service/proto && mkdir -p service/proto/detseg/v1 \
    && python -m grpc_tools.protoc -Iservice/proto=protos --python_out=. --grpc_python_out=. --pyi_out=. \
        service/proto/detseg/v1/detseg.proto \
    && touch service/proto/__init__.py service/proto/detseg/__init__.py service/proto/detseg/v1/__init__.py \
    && pip install --no-deps --force-reinstall . \
    && pip check
# The installed package (not the source folder) imports, generated code included, and its numba kernels compile.
# (At run time a container compiles them once into $HOME/.cache/numba: the package's folder is not its user's.)
WORKDIR /
RUN python -c "import service.proto.detseg.v1.detseg_pb2_grpc, service.cli, service.processing.native"

FROM ${PYTHON_IMAGE} AS runtime
# OpenCV (ultralytics) needs libGL and glib at import; redis-server is the shared tier `detseg serve --workers N`
# starts for its workers on a unix socket (DETSEG_WORKERS; never a TCP port, nothing persisted).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 detseg \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/detseg --create-home --shell /usr/sbin/nologin detseg \
    && mkdir -p /var/cache/detseg \
    && chown 10001:10001 /var/cache/detseg
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/detseg \
    DETSEG_HOST=0.0.0.0 \
    DETSEG_CACHE_DIR=/var/cache/detseg \
    MALLOC_MMAP_MAX_=0 \
    MALLOC_TRIM_THRESHOLD_=1099511627776 \
    MALLOC_TOP_PAD_=268435456
USER 10001:10001
WORKDIR /home/detseg
EXPOSE 50051
ENTRYPOINT ["detseg", "serve"]
