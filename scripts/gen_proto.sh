#!/usr/bin/env bash
# Generate the Python gRPC code for every file under proto/ next to the package it declares
# (proto/vaeserve/v1 -> vaeserve/v1, proto/vaeserve/oip/v2 -> vaeserve/oip/v2); never edit those files by hand.
# tests/service/test_proto.py fails when the checked-in code is stale.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
exec "$PYTHON" -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. $(find proto -name '*.proto' | sort)
