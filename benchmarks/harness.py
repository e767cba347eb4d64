"""A real `vaeserve serve` as a subprocess on loopback, for the benchmarks and the tests: started from
VAESERVE_* variables as a deployment would, watched through grpc.health.v1, /metrics and /proc."""

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


def model_version(repository: Path, model: str | None = None):
    """The newest valid version of `model` (default: the first model by name) under `repository`."""
    from vaeserve.artifact.repository import newest, scan_repository
    from vaeserve.errors import ConfigError

    found = scan_repository(repository)
    if not found or (model and model not in found):
        raise ConfigError(f"no valid version of {model or 'any model'} under {repository}")
    return newest(found[model or sorted(found)[0]])


def run_scenario(repository: Path, out: Path, scenario, **settings) -> tuple[dict, int]:
    """Start `vaeserve serve` on repository (its log in out/server.log), wait for SERVING, run the
    coroutine function scenario(server) -> result, stop the server: (result, its exit status)."""
    import asyncio

    out.mkdir(parents=True, exist_ok=True)
    server = start_server(repository, log=out / "server.log", **settings)
    try:
        server.wait_serving()
        result = asyncio.run(scenario(server))
    finally:
        code = server.stop()
    return result, code


def cpu_seconds(pid: int) -> tuple[float, float] | None:
    """(main thread, whole process) CPU seconds so far of process `pid`, from /proc: the main thread's run
    time in ns (schedstat; a server's event loop, which also runs small batches), the process's user + system
    time in clock ticks (stat; every thread, ended ones too). None without /proc or the process."""
    try:
        with open(f"/proc/{pid}/task/{pid}/schedstat") as f:
            main = int(f.read().split()[0]) / 1e9
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return main, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    process: subprocess.Popen
    port: int
    metrics_port: int
    log: Path | None = None  # the server's stdout and stderr, when kept
    settings: dict = field(default_factory=dict)  # what start_server was given

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log is not None and self.log.exists() else ""

    def health(self, service: str = "", credentials=None) -> int | None:
        """The health status, or None while nothing answers; `credentials` (grpc.ChannelCredentials) for
        a TLS port."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        channel = grpc.insecure_channel(self.target) if credentials is None else grpc.secure_channel(self.target, credentials)
        with channel:
            try:
                return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=1).status
            except grpc.RpcError:
                return None

    def wait_serving(self, timeout: float = 60.0, credentials=None) -> list[int | None]:
        """Poll health until SERVING; the statuses seen on the way."""
        from grpc_health.v1 import health_pb2

        seen, end = [], time.monotonic() + timeout
        while time.monotonic() < end:
            if self.process.poll() is not None:
                raise RuntimeError(f"vaeserve serve exited with {self.process.returncode}\n{self.log_text()}")
            status = self.health(credentials=credentials)
            seen.append(status)
            if status == health_pb2.HealthCheckResponse.SERVING:
                return seen
            time.sleep(0.05)
        raise TimeoutError(f"vaeserve serve not SERVING after {timeout} s\n{self.log_text()}")

    def metrics(self) -> dict:
        """{(sample name, sorted labels): value} from the metrics port, through prometheus_client's parser."""
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def memory(self) -> dict[str, int]:
        """Resident set size now and at its peak (VmRSS, VmHWM), in bytes, from /proc."""
        fields = {}
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
        return fields

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, as Kubernetes and `docker stop` send it; the exit status after the drain."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:  # never leave a server behind: kill it, and say it did not stop
            self.process.kill()
            self.process.wait()
            raise


def start_server(repository: Path, *, log: Path | None = None, entry_point: bool = False, **settings) -> ServerProcess:
    """`vaeserve serve` on loopback, on free ports unless `port` / `metrics_port` are given, settings as
    VAESERVE_* variables. `entry_point` runs the installed console script (as the image does) instead of
    `python -m vaeserve.cli`."""
    port, metrics_port = settings.pop("port", None) or free_port(), settings.pop("metrics_port", None) or free_port()
    # No drain notice unless asked: there is no balancer on loopback to notice NOT_SERVING.
    env = dict(os.environ, VAESERVE_REPOSITORY=str(repository), VAESERVE_HOST="127.0.0.1", VAESERVE_METRICS_HOST="127.0.0.1",
               VAESERVE_PORT=str(port), VAESERVE_METRICS_PORT=str(metrics_port), VAESERVE_DRAIN_NOTICE_SECONDS="0")  # fmt: skip
    env.update({f"VAESERVE_{name.upper()}": str(value) for name, value in settings.items()})
    command = [str(Path(sys.executable).with_name("vaeserve"))] if entry_point else [sys.executable, "-m", "vaeserve.cli"]
    out = open(log, "w") if log is not None else subprocess.DEVNULL
    try:
        process = subprocess.Popen([*command, "serve"], env=env, stdout=out, stderr=subprocess.STDOUT)
    finally:
        if log is not None:
            out.close()
    return ServerProcess(process, port, metrics_port, log, settings)
