"""The Dockerfile's structure (no container engine runs here): stages and bases, non-root user, ports,
health check, entrypoint, and the same pinned serving install the setup script runs, without torch."""

import json
import re
import shlex
import tomllib

import pytest

from deploy_support import ROOT
from vaeserve.service.settings import describe

RUNTIME_STAGES = ("cpu", "gpu")


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[dict]]:
    """(global ARG defaults, stages); each stage: name, base, instructions [(KEYWORD, arguments)]."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    args, stages = {}, []
    for line in filter(None, (line.strip() for line in text.splitlines())):
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            base, _, name = rest.partition(" AS ")
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base.strip())
            stages.append({"name": name.strip(), "base": base, "instructions": []})
        elif keyword == "ARG" and not stages:
            key, _, default = rest.partition("=")
            args[key] = default
        else:
            stages[-1]["instructions"].append((keyword, rest))
    return args, stages


@pytest.fixture(scope="module")
def stages():
    _, stages = parse_dockerfile((ROOT / "Dockerfile").read_text())
    return {stage["name"]: stage for stage in stages} | {"_order": [stage["name"] for stage in stages]}


def instructions(stage, keyword):
    return [rest for kw, rest in stage["instructions"] if kw == keyword]


def test_stages_and_bases(stages):
    assert stages["_order"] == ["builder", "cpu", "gpu"]  # gpu last: the default target
    assert re.fullmatch(r"nvidia/cuda:13\.\d+\.\d+-cudnn-runtime-ubuntu24\.04", stages["gpu"]["base"])
    # One venv for both runtimes: its python3 link must resolve the same way in builder, cpu and gpu.
    assert stages["builder"]["base"] == stages["cpu"]["base"] == "ubuntu:24.04"


def test_gpu_and_cpu_stages_differ_only_in_base(stages):
    assert stages["gpu"]["instructions"] == stages["cpu"]["instructions"]


@pytest.mark.parametrize("name", RUNTIME_STAGES)
def test_runtime_stage(stages, name):
    stage = stages[name]
    user = instructions(stage, "USER")
    assert user == ["10001:10001"]  # not root; deployment.yaml's runAsUser matches
    assert sorted(int(p) for rest in instructions(stage, "EXPOSE") for p in rest.split()) == [8000, 50051]
    assert json.loads(instructions(stage, "ENTRYPOINT")[0]) == ["vaeserve", "serve"]
    assert json.loads(instructions(stage, "VOLUME")[0]) == ["/models"]
    env = dict(token.split("=", 1) for token in shlex.split(" ".join(instructions(stage, "ENV"))))
    settings = {env_name for _, env_name, *_ in describe()}
    assert {key for key in env if key.startswith("VAESERVE_")} <= settings
    assert env["VAESERVE_REPOSITORY"] == "/models"
    assert (env["VAESERVE_PORT"], env["VAESERVE_METRICS_PORT"]) == ("50051", "8000")
    # The settings bind loopback; in a container that would reach nothing from outside (-p, pod IPs).
    defaults = {env_name: default for _, env_name, default, *_ in describe()}
    assert defaults["VAESERVE_HOST"] == defaults["VAESERVE_METRICS_HOST"] == "127.0.0.1"
    assert (env["VAESERVE_HOST"], env["VAESERVE_METRICS_HOST"]) == ("[::]", "[::]")
    assert env["PATH"].startswith("/opt/vaeserve/bin:")
    healthcheck = instructions(stage, "HEALTHCHECK")
    assert len(healthcheck) == 1
    options, _, command = healthcheck[0].partition("CMD ")
    assert json.loads(command) == ["python", "/opt/vaeserve/healthcheck.py"]
    assert "COPY deploy/docker/healthcheck.py /opt/vaeserve/healthcheck.py" in [f"COPY {c}" for c in instructions(stage, "COPY")]
    assert "--start-period=" in options


@pytest.mark.parametrize("name", RUNTIME_STAGES)
def test_runtime_stages_install_nothing_from_pip(stages, name):
    # The runtime stages only copy the builder's venv; no pip there, so no torch and nothing unpinned.
    assert instructions(stages[name], "COPY")[0] == "--from=builder /opt/vaeserve /opt/vaeserve"
    assert not any("pip" in run for run in instructions(stages[name], "RUN"))


def pip_install_options(command: str) -> tuple[set[str], str]:
    """Options and the requirement of a `python -m pip install ...` command line."""
    tokens = shlex.split(command)
    tokens = tokens[tokens.index("install") + 1 :]
    options, requirement, i = set(), None, 0
    while i < len(tokens):
        if tokens[i] == "-c":
            options.add(f"-c {tokens[i + 1]}")
            i += 2
            continue
        if tokens[i] in {"&&", ";"}:
            break
        if tokens[i].startswith("-") and tokens[i] != "-e":
            options.add(tokens[i])
        elif tokens[i] != "-e":
            requirement = tokens[i]
        i += 1
    return options, requirement


def test_builder_runs_the_setup_scripts_pinned_install_without_extras(stages):
    [docker_pip] = [run for run in instructions(stages["builder"], "RUN") if "pip install" in run]
    [setup_pip] = [line for line in (ROOT / "scripts" / "setup.sh").read_text().splitlines() if "pip install" in line]
    docker_options, docker_requirement = pip_install_options(docker_pip[docker_pip.index("/opt/vaeserve/bin/python") :])
    setup_options, setup_requirement = pip_install_options(setup_pip.strip())
    assert "-c constraints.txt" in setup_options
    assert setup_options <= docker_options, "the image must install the way the README setup does"
    assert docker_options - setup_options == {"--no-cache-dir"}
    assert setup_requirement.startswith(".[")  # the project with extras, editable
    assert docker_requirement == "."  # the project alone: the serving install


def test_the_serving_install_has_no_torch_and_no_tritonclient():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [re.match(r"[A-Za-z0-9_.-]+", requirement).group().lower() for requirement in project["dependencies"]]
    assert "torch" not in names and "tritonclient" not in names and "onnxruntime-gpu" in names
    assert any(r.startswith("torch") for r in project["optional-dependencies"]["train"])
    assert any(r.startswith("tritonclient") for r in project["optional-dependencies"]["dev"])  # the tests' OIP client


def test_build_context_holds_what_the_builder_copies(stages):
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    assert "*" in ignore, "the build context is an allow-list"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = []
    for name in ("builder", *RUNTIME_STAGES):
        for rest in instructions(stages[name], "COPY"):
            if not rest.startswith("--from="):
                copied += rest.split()[:-1]
    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values()
    assert {d for d in package_dirs if d} <= {c.rstrip("/") for c in copied}
    for source in copied:
        assert source.rstrip("/") in allowed, f"{source} is copied but excluded by .dockerignore"
        assert (ROOT / source).exists(), source
