#!/usr/bin/env bash
# From a clean clone: set up ./.venv, train the default model on the built-in digits, export it into
# ./models and serve it on localhost:50051 (metrics on :8000) until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/vaeserve train --out runs/digits
.venv/bin/vaeserve export runs/digits --repository models --name digits
cat <<'MSG'

Serving model 'digits' on localhost:50051 (Prometheus metrics on http://localhost:8000/metrics).
From another shell:
    .venv/bin/vaeserve client models
    .venv/bin/vaeserve client score --model digits runs/digits/sample_rows.csv --iw-samples 64
Ctrl-C stops the server after in-flight requests finish.

MSG
exec .venv/bin/vaeserve serve --repository models
