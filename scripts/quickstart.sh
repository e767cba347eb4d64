#!/usr/bin/env bash
# From a clean clone: set up ./.venv, train the default model on the built-in digits, export it into
# ./models and serve it on localhost:50051 (metrics on :8000) until Ctrl-C. Run again, it reuses the run
# in runs/digits and the version exported from it, and trains or exports only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
vaeserve=.venv/bin/vaeserve
port=${VAESERVE_PORT:-50051} metrics_port=${VAESERVE_METRICS_PORT:-8000}  # as `vaeserve serve` reads them
flag=$([ "$port" = 50051 ] || echo " --port $port")  # for the client, which does not read VAESERVE_PORT
bash scripts/setup.sh

if "$vaeserve" client models --port "$port" --timeout 2 >/dev/null 2>&1; then  # a quickstart still running?
    echo "quickstart: a server already answers on localhost:$port; call it from another shell, or stop it" \
         "(Ctrl-C where it runs) and run this again" >&2
    exit 1
fi
# A run counts once its training has finished (metrics.json then holds the validation results); one cut
# short by Ctrl-C is trained again.
if grep -qs '"validation"' runs/digits/metrics.json; then
    echo "quickstart: reusing the trained model in runs/digits"
else
    "$vaeserve" train --out runs/digits
fi
# A version counts when it was exported from this run: its manifest names the run's sha256, over
# weights.pt then config.json (Checkpoint.sha256).
run=$(cat runs/digits/weights.pt runs/digits/config.json | sha256sum | cut -d' ' -f1)
if exported=$(grep -ls "\"$run\"" models/digits/*/manifest.json); then
    echo "quickstart: reusing $(dirname "${exported%%$'\n'*}"), exported from runs/digits"
else
    "$vaeserve" export runs/digits --repository models --name digits
fi

# "Serving" once the server answers: asked from the background while the server runs in the foreground
# (exec, under this script's pid), so that Ctrl-C reaches the server alone and it drains. Once exited, the
# server may linger as a zombie until whatever started this script reaps it.
running() { kill -0 $$ 2>/dev/null && [[ $(ps -o stat= -p $$ 2>/dev/null) != Z* ]]; }
(
    for _ in $(seq 120); do  # 60 s
        sleep 0.5
        if "$vaeserve" client models --port "$port" --timeout 1 >/dev/null 2>&1; then
            running || exit 0  # the answer came from another server; ours has exited
            cat <<MSG

Serving model 'digits' on localhost:$port (Prometheus metrics on http://localhost:$metrics_port/metrics).
From another shell:
    .venv/bin/vaeserve client models$flag
    .venv/bin/vaeserve client score --model digits runs/digits/sample_rows.csv --iw-samples 64$flag
Ctrl-C stops the server after in-flight requests finish.

MSG
            exit 0
        fi
        running || exit 0  # the server exited; its error is above
    done
    echo "quickstart: the server has not answered on localhost:$port within 60 s; its log is above" >&2
) &
exec "$vaeserve" serve --repository models
