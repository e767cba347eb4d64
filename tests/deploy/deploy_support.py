"""Helpers for the deploy tests: repository paths, the Prometheus tools, and the metric names the
server exports (read from vaeserve.service.metrics, so dashboards and alerts cannot drift from it)."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"

# Series a scrape adds next to a metric family's name, by family type (prometheus_client naming).
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"), "gauge": ("",)}


def prometheus_tool(name: str) -> str:
    """Path of `prometheus` or `promtool`; the test setup installs them (scripts/install_prometheus.sh)."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run scripts/install_prometheus.sh (Debian package `prometheus`)")
    return path


def exported_metric_names() -> set[str]:
    """Every series name a vaeserve /metrics page can carry: the service's metrics plus process metrics."""
    from prometheus_client import CollectorRegistry, ProcessCollector
    from prometheus_client.metrics import MetricWrapperBase

    from vaeserve.service import metrics

    names = set()
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            for family in value.describe():
                names.update(family.name + suffix for suffix in SUFFIXES[family.type])
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    names.update(sample.name for family in registry.collect() for sample in family.samples)
    return names


PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers that are not functions, keywords, labels or strings."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals (label values, regexes)
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range and subquery durations
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # label lists
    words = re.findall(r"(?<![\w.$])[A-Za-z_:][\w:]*\b(?!\s*\()", expr)
    return {w for w in words if w.lower() not in PROMQL_KEYWORDS}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`vaeserve serve` run the way the image runs it: the installed console script, configured by
    VAESERVE_* variables. (The service tests start theirs through `python -m`; this one also proves
    the entry point.)"""

    def __init__(self, repository: Path, log: Path, **settings):
        self.port, self.metrics_port, self.log = free_port(), free_port(), log
        env = dict(os.environ, VAESERVE_REPOSITORY=str(repository), VAESERVE_HOST="127.0.0.1",
                   VAESERVE_PORT=str(self.port), VAESERVE_METRICS_PORT=str(self.metrics_port))  # fmt: skip
        env.update({f"VAESERVE_{name.upper()}": str(value) for name, value in settings.items()})
        entry_point = Path(sys.executable).with_name("vaeserve")
        with open(log, "w") as out:
            self.process = subprocess.Popen([str(entry_point), "serve"], env=env, stdout=out, stderr=subprocess.STDOUT)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_serving(self, timeout: float = 60.0) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        end = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                assert self.process.poll() is None, f"vaeserve serve exited:\n{self.log.read_text()}"
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                assert time.monotonic() < end, f"vaeserve serve not SERVING after {timeout} s:\n{self.log.read_text()}"
                time.sleep(0.05)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, as Kubernetes and `docker stop` send it; the exit status after the drain."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)
