"""A real server on loopback, as a subprocess of `vaeserve serve`, over the exported test repository."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

LIMITS = {"max_rows": 1000, "max_iw_samples": 256}  # the session server's


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    process: subprocess.Popen
    port: int
    metrics_port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def health(self, service: str = "") -> int | None:
        """The health status, or None while nothing answers."""
        with grpc.insecure_channel(self.target) as channel:
            try:
                return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=1).status
            except grpc.RpcError:
                return None

    def metrics(self) -> dict:
        """{(sample name, sorted labels): value} from the metrics port, through prometheus_client's parser."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def wait_serving(self, timeout: float = 60.0) -> list[int | None]:
        """Poll health until SERVING; the statuses seen on the way."""
        seen, end = [], time.monotonic() + timeout
        while time.monotonic() < end:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}")
            status = self.health()
            seen.append(status)
            if status == health_pb2.HealthCheckResponse.SERVING:
                return seen
            time.sleep(0.05)
        raise TimeoutError("server did not become SERVING")

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


def _start_server(repository: Path, **env) -> RunningServer:
    port, metrics_port = free_port(), free_port()
    environ = dict(os.environ, VAESERVE_REPOSITORY=str(repository), VAESERVE_HOST="127.0.0.1",
                   VAESERVE_PORT=str(port), VAESERVE_METRICS_PORT=str(metrics_port))  # fmt: skip
    environ.update({f"VAESERVE_{k.upper()}": str(v) for k, v in env.items()})
    process = subprocess.Popen([sys.executable, "-m", "vaeserve.cli", "serve"], env=environ,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    return RunningServer(process, port, metrics_port)


@pytest.fixture(scope="session")
def server(model_repository):
    """One server for the read-only tests: a short queue delay so concurrent requests batch."""
    running = _start_server(model_repository, max_queue_delay_ms=5, **LIMITS)
    try:
        running.wait_serving()
        yield running
    finally:
        running.stop()


@pytest.fixture
def start_server():
    """Start another server subprocess: start_server(repository, **settings) -> RunningServer."""
    return _start_server


@pytest.fixture(scope="session")
def limits():
    return LIMITS


@pytest.fixture(scope="session")
def client(server):
    from vaeserve.service.client import Client

    with Client(server.target) as c:
        yield c


@pytest.fixture(scope="session")
def rows(digits):
    """Raw held-out digits rows (features 0..16)."""
    data, _, val = digits
    return data.x[val][:32].astype("float32"), [data.label_names[i] for i in data.y[val][:32]]
