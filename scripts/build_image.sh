#!/usr/bin/env bash
# Build the loupe image with a CPU-only torch and print its size and the build time.
#
#   scripts/build_image.sh                      # localhost/loupe:<version>, PyTorch's CPU index
#   IMAGE=registry.example/loupe:0.1.0 scripts/build_image.sh
#
# Environment:
#   IMAGE           image name (default localhost/loupe:<pyproject version>)
#   BUILDER         docker | podman | buildah (default: the first one found; buildah builds with
#                   --isolation chroot, which needs no daemon)
#   BASE_IMAGE      the FROM image (default python:3.11-slim-bookworm, from your registry)
#   DEBOOTSTRAP_BASE=1  build the base image here instead: debootstrap a Debian bookworm minbase with
#                   python3 + python3-venv and import it as localhost/loupe-base:bookworm (no registry
#                   needed; podman/buildah only; DEBIAN_MIRROR, default http://deb.debian.org/debian)
#   WHEELS_DIR      a directory of wheels (e.g. /opt/wheels holding torch-2.13.0+cpu) mounted into the
#                   install step as PIP_FIND_LINKS, instead of PyTorch's CPU index (podman/buildah only)
#   TORCH_CPU_INDEX PyTorch's CPU wheel index (default https://download.pytorch.org/whl/cpu), passed
#                   as PIP_EXTRA_INDEX_URL when WHEELS_DIR is not set
#   PIP_CERT_FILE   CA bundle pip inside the build must trust (a TLS-intercepting proxy), mounted;
#                   default: $PIP_CERT when that file exists
#   ULIMIT_NOFILE / ULIMIT_NPROC  limits of the RUN steps for podman/buildah (default 1024, which a
#                   sandbox that cannot raise limits accepts)
set -euo pipefail
cd "$(dirname "$0")/.."

version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)
IMAGE=${IMAGE:-localhost/loupe:${version}}
BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim-bookworm}
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
ULIMIT_NOFILE=${ULIMIT_NOFILE:-1024}
ULIMIT_NPROC=${ULIMIT_NPROC:-1024}
PIP_CERT_FILE=${PIP_CERT_FILE:-}
if [[ -z "$PIP_CERT_FILE" && -n "${PIP_CERT:-}" && -f "${PIP_CERT:-}" ]]; then PIP_CERT_FILE=$PIP_CERT; fi

if [[ -z "${BUILDER:-}" ]]; then
  for b in docker podman buildah; do
    if command -v "$b" >/dev/null; then BUILDER=$b; break; fi
  done
fi
[[ -n "${BUILDER:-}" ]] || { echo "build_image.sh: no docker, podman or buildah found" >&2; exit 1; }

if [[ "${DEBOOTSTRAP_BASE:-0}" == 1 ]]; then
  [[ "$BUILDER" != docker ]] || { echo "build_image.sh: DEBOOTSTRAP_BASE=1 needs podman or buildah" >&2; exit 1; }
  BASE_IMAGE=localhost/loupe-base:bookworm
  if ! podman image exists "$BASE_IMAGE"; then
    rootfs=$(mktemp -d /var/tmp/loupe-rootfs.XXXXXX)
    trap 'rm -rf "$rootfs"' EXIT
    echo "debootstrap: Debian bookworm minbase + python3, python3-venv -> $BASE_IMAGE"
    debootstrap --variant=minbase --include=python3,python3-venv bookworm "$rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >/dev/null
    tar -C "$rootfs" -c . | podman import - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
    trap - EXIT
  fi
fi

args=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
mounts=()
if [[ -n "${WHEELS_DIR:-}" ]]; then
  mounts+=(-v "$(realpath "$WHEELS_DIR"):/build-wheels:ro")
  args+=(--build-arg PIP_FIND_LINKS=/build-wheels)
else
  args+=(--build-arg "PIP_EXTRA_INDEX_URL=$TORCH_CPU_INDEX")
fi
if [[ -n "$PIP_CERT_FILE" ]]; then
  mounts+=(-v "$(realpath "$PIP_CERT_FILE"):/build-ca.crt:ro")
  args+=(--build-arg PIP_CERT=/build-ca.crt)
fi

start=$(date +%s)
case "$BUILDER" in
  docker)
    [[ ${#mounts[@]} -eq 0 ]] || { echo "build_image.sh: WHEELS_DIR / PIP_CERT_FILE need podman or buildah (docker build cannot mount into RUN)" >&2; exit 1; }
    docker build "${args[@]}" -t "$IMAGE" . ;;
  podman)
    podman build --isolation chroot --ulimit "nofile=$ULIMIT_NOFILE:$ULIMIT_NOFILE" --ulimit "nproc=$ULIMIT_NPROC:$ULIMIT_NPROC" \
      "${mounts[@]}" "${args[@]}" -t "$IMAGE" . ;;
  buildah)
    buildah bud --isolation chroot --ulimit "nofile=$ULIMIT_NOFILE:$ULIMIT_NOFILE" --ulimit "nproc=$ULIMIT_NPROC:$ULIMIT_NPROC" \
      "${mounts[@]}" "${args[@]}" -t "$IMAGE" . ;;
  *) echo "build_image.sh: unknown BUILDER=$BUILDER" >&2; exit 1 ;;
esac
elapsed=$(( $(date +%s) - start ))

size=$("$BUILDER" image inspect --format '{{.Size}}' "$IMAGE" 2>/dev/null || buildah inspect --format '{{.Size}}' "$IMAGE" 2>/dev/null || echo "?")
echo "built $IMAGE in ${elapsed} s (base $BASE_IMAGE), size ${size} bytes"
