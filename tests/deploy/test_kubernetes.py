"""The Kubernetes manifests parse, hang together (names, labels, ports), and say what the server
needs: a GPU, every interface bound, gRPC health probes on the plaintext health port, TLS and token
Secrets mounted read-only, TLS Services (ClusterIP and headless), a termination period longer than the
drain notice and the drain."""

from pathlib import Path

import pytest
import yaml

from deploy_support import DEPLOY, exported_metric_names
from vaeserve.service.settings import describe

KUBERNETES = DEPLOY / "kubernetes"


def load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.fixture(scope="module")
def objects() -> dict[tuple[str, str], dict]:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}, "apply -k must apply every manifest"
    found = {}
    for name in sorted(listed):
        for doc in load(KUBERNETES / name):
            assert {"apiVersion", "kind", "metadata"} <= set(doc), name
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in found, key
            found[key] = doc
    assert kustomization["namespace"] == found[("Namespace", "vaeserve")]["metadata"]["name"]
    return found


@pytest.fixture(scope="module")
def pod(objects):
    return objects[("Deployment", "vaeserve")]["spec"]["template"]


@pytest.fixture(scope="module")
def container(pod):
    [container] = pod["spec"]["containers"]
    return container


def env_of(container) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"]}


def test_deployment_requests_one_gpu(container, pod):
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["spec"]["tolerations"]


def test_environment_names_real_settings_and_matches_the_ports(container, pod):
    env = env_of(container)
    assert set(env) <= {env_name for _, env_name, *_ in describe()}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    settings = {name: int(env[f"VAESERVE_{variable}"]) for name, variable in
                (("grpc", "PORT"), ("health", "HEALTH_PORT"), ("metrics", "METRICS_PORT"))}  # fmt: skip
    assert ports == settings == {"grpc": 50051, "health": 50052, "metrics": 8000}
    # The settings default to loopback; in a pod the kubelet, the Services and Prometheus come from outside.
    assert (env["VAESERVE_HOST"], env["VAESERVE_METRICS_HOST"]) == ("[::]", "[::]")
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == env["VAESERVE_METRICS_PORT"]
    assert annotations["prometheus.io/path"] == "/metrics"


@pytest.mark.parametrize("probe", ["startupProbe", "readinessProbe", "livenessProbe"])
def test_native_grpc_health_probes_on_the_health_port(container, probe):
    # grpc.health.v1, service "": the whole server. The probes cannot speak TLS, so they use the
    # plaintext health port (a number: a gRPC probe takes no port name).
    health = {p["name"]: p["containerPort"] for p in container["ports"]}["health"]
    assert container[probe]["grpc"] == {"port": health} == {"port": int(env_of(container)["VAESERVE_HEALTH_PORT"])}


def test_termination_outlasts_the_drain_notice_and_the_drain(container, pod):
    env = env_of(container)
    notice, drain = float(env["VAESERVE_DRAIN_NOTICE_SECONDS"]), float(env["VAESERVE_DRAIN_SECONDS"])
    assert notice > 0  # the server keeps serving while endpoints update: no preStop sleep needed
    assert "lifecycle" not in container
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace > notice + drain + 10, (grace, notice, drain)
    # A draining pod answers NOT_SERVING: it must leave the endpoints at once, and not be restarted.
    assert container["readinessProbe"]["failureThreshold"] == 1
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > notice + drain


# Secret, its keys, and the variables that must point at them inside the mount.
SECRETS = {
    "vaeserve-tls": {"tls.crt": "VAESERVE_TLS_CERT", "tls.key": "VAESERVE_TLS_KEY"},
    "vaeserve-tokens": {"tokens": "VAESERVE_AUTH_TOKENS_FILE"},
}


def test_tls_and_token_secrets_mounted_read_only(objects, container, pod):
    env = env_of(container)
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    by_secret = {v["secret"]["secretName"]: name for name, v in volumes.items() if "secret" in v}
    assert set(by_secret) == set(SECRETS)
    for secret, keys in SECRETS.items():
        volume, mount = volumes[by_secret[secret]], mounts[by_secret[secret]]
        # Required, and created by the operator (examples/secrets.yaml), never applied from placeholders.
        assert volume["secret"]["optional"] is False and ("Secret", secret) not in objects
        assert mount["readOnly"] is True
        assert "subPath" not in mount  # a subPath mount is never updated: rotation would need a restart
        assert mount["mountPath"].startswith("/etc/vaeserve/")
        for key, variable in keys.items():
            assert env[variable] == f"{mount['mountPath']}/{key}"
    assert "VAESERVE_TLS_CLIENT_CA" not in env  # mTLS is the operator's choice: clients need certificates


def test_example_secrets_match_what_the_deployment_mounts():
    secrets = {doc["metadata"]["name"]: doc for doc in load(KUBERNETES / "examples" / "secrets.yaml")}
    assert set(secrets) == set(SECRETS)
    assert secrets["vaeserve-tls"]["type"] == "kubernetes.io/tls"  # what `kubectl create secret tls` makes
    for name, keys in SECRETS.items():
        assert set(secrets[name]["stringData"]) == set(keys)
        assert secrets[name]["metadata"]["namespace"] == "vaeserve"
    assert "PLACEHOLDER" in secrets["vaeserve-tls"]["stringData"]["tls.key"]
    text = (KUBERNETES / "examples" / "secrets.yaml").read_text()
    assert "kubectl create secret tls vaeserve-tls" in text
    assert "kubectl create secret generic vaeserve-tokens" in text and "--from-file=tokens=" in text
    assert 'printf %s "$TOKEN" | sha256sum' in text


def test_model_volume_read_only_at_the_images_path(objects, container, pod):
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["models"]["mountPath"] == env_of(container)["VAESERVE_REPOSITORY"] == "/models"
    assert mounts["models"]["readOnly"] is True
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    claim = volumes["models"]["persistentVolumeClaim"]
    assert claim["readOnly"] is True
    assert objects[("PersistentVolumeClaim", claim["claimName"])]["spec"]["accessModes"] == ["ReadOnlyMany"]
    assert "emptyDir" in volumes[mounts["tmp"]["name"]]  # writable /tmp under a read-only root


def test_runs_as_the_images_non_root_user(pod, container):
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True
    assert (security["runAsUser"], security["runAsGroup"]) == (10001, 10001)  # the Dockerfile's USER
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_services_route_grpc_over_tls(objects, pod, container):
    labels = pod["metadata"]["labels"]
    assert "VAESERVE_TLS_CERT" in env_of(container)
    # The port speaks TLS, so not h2c (HTTP/2 in cleartext): https, HTTP/2 over TLS.
    grpc_port = {"name": "grpc", "port": 50051, "targetPort": "grpc", "appProtocol": "https"}
    for name, headless, exposed in (("vaeserve", False, {"grpc"}), ("vaeserve-headless", True, {"grpc", "metrics"})):
        spec = objects[("Service", name)]["spec"]
        assert spec["selector"].items() <= labels.items(), name
        assert (spec.get("clusterIP") == "None") is headless, name
        ports = {p["name"]: p for p in spec["ports"]}
        # Metrics (plaintext, no auth) only on the headless Service Prometheus discovers the pods by;
        # the health port on neither: only the kubelet uses it.
        assert set(ports) == exposed, name
        assert ports["grpc"] == grpc_port
        assert all(ports[port]["targetPort"] == port for port in exposed), name


def test_deployment_selector_matches_its_pods(objects, pod):
    deployment = objects[("Deployment", "vaeserve")]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    pdb = objects[("PodDisruptionBudget", "vaeserve")]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert pdb["minAvailable"] < deployment["spec"]["replicas"]


def test_autoscaling(objects):
    hpa = objects[("HorizontalPodAutoscaler", "vaeserve")]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "vaeserve"}
    [cpu] = hpa["spec"]["metrics"]
    assert cpu["resource"]["name"] == "cpu"
    [example] = load(KUBERNETES / "examples" / "hpa-pending-requests.yaml")
    assert example["spec"]["scaleTargetRef"] == hpa["spec"]["scaleTargetRef"]
    pods_metric = next(m for m in example["spec"]["metrics"] if m["type"] == "Pods")
    assert pods_metric["pods"]["metric"]["name"] in exported_metric_names()


def test_prometheus_finds_replicas_through_the_headless_service(objects, pod):
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    [job] = config["scrape_configs"]
    assert job["job_name"] == "vaeserve"  # what the alerts and dashboard select on
    [sd] = job["dns_sd_configs"]
    headless = objects[("Service", "vaeserve-headless")]
    namespace = objects[("Namespace", "vaeserve")]["metadata"]["name"]
    assert sd["type"] == "SRV"
    assert sd["names"] == [f"_metrics._tcp.{headless['metadata']['name']}.{namespace}.svc.cluster.local"]
    [monitor] = load(KUBERNETES / "examples" / "podmonitor.yaml")
    assert monitor["kind"] == "PodMonitor"
    assert pod["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "vaeserve"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]


def test_image_is_set_through_kustomize(container):
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    [image] = kustomization["images"]
    assert image["name"] == container["image"] == "vaeserve"
    assert image["newTag"] == "gpu"
