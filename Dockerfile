# loupe image: the broker (`loupe up` on the Ray head), shard and extractor workers all run it.
# Built by your CI (no Docker daemon runs on the development machines):
#   docker build -t REGISTRY/loupe:0.1.0 .
#   docker build --build-arg PIP_INDEX_URL=<CPU wheel index> -t REGISTRY/loupe:0.1.0 .
# torch==2.13.0 is pinned in pyproject.toml; from plain PyPI it resolves to a CUDA build (several GB).
# For a CPU-only image pass PIP_INDEX_URL (and/or PIP_EXTRA_INDEX_URL) pointing at the index your
# CI provides for CPU wheels; pip reads both from the environment of the install step.
FROM python:3.11-slim-bookworm

ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=4294967296

# non-root user; the chart's podSecurityContext runs as 10001 too
RUN groupadd --gid 10001 loupe && useradd --uid 10001 --gid 10001 --create-home --shell /bin/bash loupe

WORKDIR /opt/loupe
COPY pyproject.toml README.md ./
COPY clients/python ./clients/python
COPY services ./services
COPY cluster ./cluster
COPY protos ./protos

# the one install command: the project and its dependencies as declared in pyproject.toml; the
# thin client (clients/python) is named beside it because its pinned loupe-client is on no index
RUN pip install --no-cache-dir ./clients/python .

USER 10001:10001
WORKDIR /home/loupe
EXPOSE 50051 9090 6379 8265 10001 8080
CMD ["loupe", "--help"]
