#!/usr/bin/env bash
# Regenerates everything derived from protos/loupe/v1/*.proto (the single source):
#   clients/python/loupe/v1/*_pb2.py, *_pb2.pyi, *_pb2_grpc.py   (grpcio-tools)
# tests/unit/test_generated_protos.py fails when they are stale.
# Usage: scripts/gen_protos.sh [python]   (default: .venv/bin/python)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${1:-$root/.venv/bin/python}
cd "$root"
out=clients/python
rm -f "$out"/loupe/v1/*_pb2.py "$out"/loupe/v1/*_pb2.pyi "$out"/loupe/v1/*_pb2_grpc.py
"$py" -m grpc_tools.protoc -I protos \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  protos/loupe/v1/*.proto
# protoc and the grpc plugin write "DO NOT EDIT" headers themselves.

