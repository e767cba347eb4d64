#!/usr/bin/env bash
# Set up ./.venv (see setup.sh), install Prometheus for the deploy tests when missing, run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/install_prometheus.sh
exec .venv/bin/python -m pytest "$@"
