#!/usr/bin/env bash
# Install Prometheus and promtool (Debian package `prometheus`) for the deploy tests, when either is missing.
# Safe to run again: it does nothing when both are on PATH. Needs root or sudo for apt-get.
set -euo pipefail
if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
    exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "install_prometheus.sh: need root or sudo to apt-get install prometheus" >&2; exit 1; }
    sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# The package's postinst tries to start the daemon; without an init system that is refused, which is what we want.
if ! { $sudo apt-get update -qq && $sudo apt-get install -y -qq --no-install-recommends prometheus; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "install_prometheus.sh: apt-get install prometheus failed" >&2
    exit 1
fi
command -v prometheus >/dev/null && command -v promtool >/dev/null
