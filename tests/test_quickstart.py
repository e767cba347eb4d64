"""scripts/quickstart.sh, as written, in a folder of its own where `.venv/bin/vaeserve` is a stand-in that
logs its commands (the real train takes ~20 s): what runs on a first and a second run, when a server
already answers, and when the server answers at all. One test checks the real exporter against the
script's way of matching a version to the run it came from."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"

# The stand-in: train and export write what the real ones do as far as the script looks (metrics.json's
# "validation", the manifest's source_checkpoint sha256); `client` answers while the stand-in server says
# it is up; `serve` exits with $SERVE_EXIT at once, or is up after a moment for $SERVE_SECONDS (0: not at all).
VAESERVE = r"""#!/usr/bin/env bash
echo "$*" >> calls.log
case "$1" in
    train) mkdir -p runs/digits && echo "weights $(date +%s%N)" > runs/digits/weights.pt && echo '{}' > runs/digits/config.json
           echo '{"validation": {"neg_elbo": 23.0}}' > runs/digits/metrics.json ;;
    export) v=$(( $(ls models/digits 2>/dev/null | wc -l) + 1 )) && mkdir -p "models/digits/$v"
            sha=$(cat runs/digits/weights.pt runs/digits/config.json | sha256sum | cut -d' ' -f1)
            echo "{\"source_checkpoint\": {\"sha256\": \"$sha\"}}" > "models/digits/$v/manifest.json" ;;
    client) [ -e up ] ;;
    serve) [ "${SERVE_EXIT:-0}" = 0 ] || exit "$SERVE_EXIT"
           [ "${SERVE_SECONDS:-1}" = 0 ] && exit 0
           sleep 0.3; touch up; echo "stand-in server up"; sleep "${SERVE_SECONDS:-1}"; rm up ;;
esac
"""


@pytest.fixture
def checkout(tmp_path):
    (tmp_path / "scripts").mkdir()
    shutil.copy(SCRIPTS / "quickstart.sh", tmp_path / "scripts")
    (tmp_path / "scripts" / "setup.sh").write_text("")  # the real one installs ./.venv
    stub = tmp_path / ".venv" / "bin" / "vaeserve"
    stub.parent.mkdir(parents=True)
    stub.write_text(VAESERVE)
    stub.chmod(0o755)
    return tmp_path


def quickstart(checkout: Path, **env) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run the script; (the run, the vaeserve commands it ran, `client models ...` left out)."""
    (checkout / "calls.log").unlink(missing_ok=True)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("VAESERVE_")} | env
    run = subprocess.run(["bash", "scripts/quickstart.sh"], cwd=checkout, env=environ, capture_output=True, text=True,
                         timeout=30)  # fmt: skip
    calls = (checkout / "calls.log").read_text().splitlines() if (checkout / "calls.log").exists() else []
    return run, [c for c in calls if not c.startswith("client")]


TRAIN, EXPORT = "train --out runs/digits", "export runs/digits --repository models --name digits"
SERVE = "serve --repository models"


def test_a_second_run_reuses_the_run_and_its_version(checkout):
    first, calls = quickstart(checkout)
    assert first.returncode == 0 and calls == [TRAIN, EXPORT, SERVE]
    # "Serving" only once the server answers, after its own line saying it is up.
    assert "Serving model 'digits' on localhost:50051" in first.stdout
    assert first.stdout.index("stand-in server up") < first.stdout.index("Serving model")

    second, calls = quickstart(checkout, SERVE_SECONDS="0")
    assert second.returncode == 0 and calls == [SERVE]
    assert second.stdout.startswith("quickstart: reusing the trained model in runs/digits\n"
                                    "quickstart: reusing models/digits/1, exported from runs/digits\n")  # fmt: skip
    assert sorted(p.name for p in (checkout / "models" / "digits").iterdir()) == ["1"]


def test_a_run_cut_short_is_trained_again_and_a_retrained_run_exported_again(checkout):
    quickstart(checkout, SERVE_SECONDS="0")
    (checkout / "runs/digits/metrics.json").write_text('{"best_epoch": 3, "history": []}')  # Ctrl-C during training
    run, calls = quickstart(checkout, SERVE_SECONDS="0")
    assert run.returncode == 0 and calls == [TRAIN, EXPORT, SERVE]
    assert sorted(p.name for p in (checkout / "models" / "digits").iterdir()) == ["1", "2"]

    (checkout / "runs/digits/weights.pt").write_text("weights trained by hand since")
    run, calls = quickstart(checkout, SERVE_SECONDS="0")
    assert run.returncode == 0 and calls == [EXPORT, SERVE]


def test_a_server_already_answering_is_one_line_and_nothing_runs(checkout):
    (checkout / "up").touch()
    run, calls = quickstart(checkout)
    assert run.returncode == 1 and calls == []
    assert run.stderr == ("quickstart: a server already answers on localhost:50051; call it from another shell, or stop "
                          "it (Ctrl-C where it runs) and run this again\n")  # fmt: skip


def test_a_server_that_fails_to_start_is_never_said_to_serve(checkout):
    run, calls = quickstart(checkout, SERVE_EXIT="2", VAESERVE_PORT="50052")
    assert run.returncode == 2 and calls == [TRAIN, EXPORT, SERVE]
    assert "Serving" not in run.stdout


def test_the_port_from_the_environment_is_the_one_asked_and_shown(checkout):
    run, _ = quickstart(checkout, VAESERVE_PORT="50052", VAESERVE_METRICS_PORT="8001")
    assert run.returncode == 0
    assert "Serving model 'digits' on localhost:50052 (Prometheus metrics on http://localhost:8001/metrics)" in run.stdout
    assert "    .venv/bin/vaeserve client models --port 50052\n" in run.stdout
    assert "client models --port 50052 --timeout 1" in (checkout / "calls.log").read_text()


def test_the_script_finds_a_version_the_exporter_wrote_from_the_run(model_repository):
    """The script's sha256 of a run (weights.pt then config.json) is the one the manifest records."""
    manifest_path = model_repository / "vae" / "1" / "manifest.json"
    source = json.loads(manifest_path.read_text())["source_checkpoint"]
    script = 'cat "$1/weights.pt" "$1/config.json" | sha256sum | cut -d" " -f1'
    sha = subprocess.run(["bash", "-c", script, "-", source["path"]], capture_output=True, text=True, check=True)
    sha = sha.stdout.strip()
    assert sha == source["sha256"]
    assert f'"{sha}"' in manifest_path.read_text()
