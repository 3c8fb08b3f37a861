# loupe image: the broker (`loupe up` on the Ray head), shard and extractor workers all run it.
# Build it with `make image` (scripts/build_image.sh: CPU torch by default, docker/podman/buildah).
# By hand, CPU-only torch (torch==2.13.0 from plain PyPI is the CUDA build, ~18 nvidia wheels):
#   docker build --build-arg PIP_EXTRA_INDEX_URL=<PyTorch's CPU index, download.pytorch.org/whl/cpu> -t REGISTRY/loupe:0.1.0 .
# pip reads PIP_INDEX_URL / PIP_EXTRA_INDEX_URL / PIP_FIND_LINKS / PIP_CERT from the build args
# (a wheel directory: mount it into the RUN step, e.g. `buildah bud -v /opt/wheels:/wheels:ro
# --build-arg PIP_FIND_LINKS=/wheels`). The build refuses to finish with a CUDA torch unless
# ALLOW_CUDA_TORCH=1. BASE_IMAGE: any Debian-based image with python3.11 and its venv module.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CERT
ARG ALLOW_CUDA_TORCH=0

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=4294967296

# non-root user; the chart's podSecurityContext runs as 10001 too. The project lives in a venv
# (Debian's own python is "externally managed"), first on PATH: `python`, `loupe`, `ray`.
RUN if [ -z "$PIP_INDEX_URL$PIP_EXTRA_INDEX_URL$PIP_FIND_LINKS" ] && [ "$ALLOW_CUDA_TORCH" != 1 ]; then \
      echo "no CPU torch source: pass --build-arg PIP_EXTRA_INDEX_URL=<PyTorch's CPU index> (or PIP_FIND_LINKS), or ALLOW_CUDA_TORCH=1 (or use make image)" >&2; exit 1; \
    fi \
    && groupadd --gid 10001 loupe && useradd --uid 10001 --gid 10001 --create-home --shell /bin/bash loupe \
    && python3 -m venv /opt/venv

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

# CPU-only image: no CUDA torch, no nvidia wheels (unless ALLOW_CUDA_TORCH=1); checked as the
# user the pods run as, which also proves the venv is readable by it
RUN python -c "import sys, importlib.metadata as m, torch; nv = sorted(d.metadata['Name'] for d in m.distributions() if d.metadata['Name'].lower().startswith('nvidia')); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'nvidia wheels', nv); sys.exit('CUDA torch installed: pass PyTorch CPU wheels (PIP_EXTRA_INDEX_URL or PIP_FIND_LINKS) or ALLOW_CUDA_TORCH=1' if (torch.version.cuda or nv) and '${ALLOW_CUDA_TORCH}' != '1' else 0)"

WORKDIR /home/loupe
EXPOSE 50051 9090 9091 9092 6379 8265 10001
CMD ["loupe", "--help"]
