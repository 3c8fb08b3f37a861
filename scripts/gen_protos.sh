#!/usr/bin/env bash
# Regenerates everything derived from protos/loupe/v1/*.proto (the single source):
#   clients/python/loupe/v1/*_pb2.py, *_pb2.pyi, *_pb2_grpc.py   (grpcio-tools)
#   clients/node/protos/loupe/v1/{retrieval,types}.proto          (copies the Node package ships)
# tests/unit/test_generated_protos.py and tests/unit/test_client_packaging.py fail when either is stale.
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
# The Node package loads the public API at run time: only retrieval.proto and what it imports.
mkdir -p clients/node/protos/loupe/v1
cp protos/loupe/v1/retrieval.proto protos/loupe/v1/types.proto clients/node/protos/loupe/v1/
