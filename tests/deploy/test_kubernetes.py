"""The Kubernetes manifests parse, hang together (names, labels, ports), and say what the server
needs: a GPU, gRPC health probes, h2c and headless Services, a termination period longer than the drain."""

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
    assert set(env) <= {env_name for _, env_name, _, _ in describe()}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": int(env["VAESERVE_PORT"]), "metrics": int(env["VAESERVE_METRICS_PORT"])} == {"grpc": 50051, "metrics": 8000}
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == env["VAESERVE_METRICS_PORT"]
    assert annotations["prometheus.io/path"] == "/metrics"


@pytest.mark.parametrize("probe", ["startupProbe", "readinessProbe", "livenessProbe"])
def test_native_grpc_health_probes(container, probe):
    assert container[probe]["grpc"] == {"port": 50051}  # grpc.health.v1, service "": the whole server


def test_termination_outlasts_the_drain(container, pod):
    drain = float(env_of(container)["VAESERVE_DRAIN_SECONDS"])
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace > float(pre_stop[1]) + drain + 10, (grace, pre_stop, drain)
    # A draining pod answers NOT_SERVING: it must leave the endpoints at once, and not be restarted.
    assert container["readinessProbe"]["failureThreshold"] == 1
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > drain


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


def test_services_route_grpc_over_h2c(objects, pod):
    labels = pod["metadata"]["labels"]
    for name, headless in (("vaeserve", False), ("vaeserve-headless", True)):
        spec = objects[("Service", name)]["spec"]
        assert spec["selector"].items() <= labels.items(), name
        assert (spec.get("clusterIP") == "None") is headless, name
        ports = {p["name"]: p for p in spec["ports"]}
        assert ports["grpc"] == {"name": "grpc", "port": 50051, "targetPort": "grpc", "appProtocol": "kubernetes.io/h2c"}
        assert ports["metrics"]["targetPort"] == "metrics"


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
