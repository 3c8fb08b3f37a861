#!/usr/bin/env bash
# Regenerates loupe/v1/*_pb2.py, *_pb2.pyi and *_pb2_grpc.py from protos/loupe/v1/*.proto.
# Usage: scripts/gen_protos.sh [python]   (default: .venv/bin/python)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${1:-$root/.venv/bin/python}
cd "$root"
rm -f loupe/v1/*_pb2.py loupe/v1/*_pb2.pyi loupe/v1/*_pb2_grpc.py
"$py" -m grpc_tools.protoc -I protos \
  --python_out=. --pyi_out=. --grpc_python_out=. \
  protos/loupe/v1/*.proto
# protoc and the grpc plugin write "DO NOT EDIT" headers themselves.
