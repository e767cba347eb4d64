#!/usr/bin/env bash
# Generate the Python gRPC code for proto/ into vaeserve/v1/ (never edit those files by hand).
# tests/service/test_proto.py fails when the checked-in code is stale.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
exec "$PYTHON" -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. proto/vaeserve/v1/vaeserve.proto
