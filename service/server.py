"""The grpc.aio server: Inference (vaeserve.v1) and the Open Inference Protocol (service/oip.py) on one
port, grpc.health.v1, reflection; Prometheus /metrics on its own port; graceful shutdown; --workers N
processes on one port through SO_REUSEPORT.

Ports first: the gRPC, health and metrics ports are checked before anything is read (check_ports), so a
port in use is one line naming it and its setting, and exit 2. Life of a worker: read and open every
version of the repository (manifests, graph hashes, ONNX Runtime sessions checked against their
manifests; the message size limits follow from the versions that pass), bind and answer health
NOT_SERVING at once, warm every version up (off the event loop), then SERVING. A version failing a check
is skipped with one log line; with none left the command exits 2 with one line. While serving, the
repository is rescanned every repository_poll_seconds and on SIGHUP (service/reload.py): versions come
and go without a restart, and health stays SERVING. On SIGTERM/SIGINT: the drain (Server.stop), then
exit 0.

Admission: at most settings.concurrent_rpcs calls inside handlers, the excess answered RESOURCE_EXHAUSTED
and counted (service/status.py); gRPC's own limit, twice that, is a backstop for calls taken in but not
yet handled. Each batcher's queue is bounded and sheds calls that would wait past their deadline
(service/batching.py).

Security (service/security.py): TLS or mTLS on the port when tls_cert is set, certificates rotated on
disk picked up by new connections; bearer tokens for every call but health when auth_tokens_file is set.
"""

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import tempfile
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from vaeserve.artifact.manifest import Manifest
from vaeserve.artifact.repository import scan_repository
from vaeserve.errors import ConfigError, VaeserveError
from vaeserve.service import memory, oip, security, status, wire
from vaeserve.service.models import ModelRegistry, no_valid_version, open_models
from vaeserve.service.reload import RepositoryWatcher
from vaeserve.service.servicer import InferenceServicer
from vaeserve.service.settings import Settings
from vaeserve.v1 import vaeserve_pb2 as pb
from vaeserve.v1 import vaeserve_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["Inference"]
SERVICE_NAME = SERVICE.full_name  # vaeserve.v1.Inference
ENVELOPE_BYTES = 64 * 1024  # a message's names, options and framing beside its rows
MAX_MESSAGE_BYTES = 2**31 - 1  # what gRPC's limits can hold
DRAIN_POLL_SECONDS = 0.01
HEALTH_CONCURRENT_RPCS = 64  # the health port answers probes, not traffic
DRAIN_QUIET_SECONDS = 0.25  # the drain ends once no call has come in for this long, with none in flight,
DRAIN_REFUSING_SECONDS = 1.0  # or once this long has passed since accepting stopped (or at drain_seconds)
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
STOP_GRACE_SECONDS = 0.5  # for a call taken in at the very end; then streams are cancelled


def message_limits(settings: Settings, manifests: list[Manifest]) -> tuple[int, int]:
    """(receive, send) byte limits: the largest request the settings admit for the widest model served
    (max_rows rows of float32 features or latents, each with a label), and the largest response
    (max_request_values float32 samples, or max_rows rows of outputs)."""
    widest = max(max(m.input.features, m.model.latent_dim) for m in manifests)
    label = max((len(name.encode()) for m in manifests for name in m.labels or ()), default=0)
    receive = settings.max_rows * (4 * widest + label + 8) + ENVELOPE_BYTES
    send = 4 * settings.max_request_values + settings.max_rows * (8 * widest + 64) + ENVELOPE_BYTES
    return min(receive, MAX_MESSAGE_BYTES), min(send, MAX_MESSAGE_BYTES)


class Server:
    def __init__(self, settings: Settings):
        self.settings = settings
        # Opened (and checked) before the server exists: its message limits follow from the models served.
        # Certificates and tokens first: a bad file is one line at once, not after minutes of loading models.
        self._certificates = security.certificates(settings)
        interceptors = security.interceptors(settings)
        if interceptors and self._certificates is None and settings.host not in LOOPBACK:
            log.warning("auth_tokens_file without TLS on %s: bearer tokens cross the network in plaintext", settings.host)
        self.opened = open_models(settings)
        self.servicer = InferenceServicer(settings)
        status.limit_in_flight(settings.concurrent_rpcs)
        self.health = health.aio.HealthServicer()
        self.registry: ModelRegistry | None = None
        self.port: int | None = None
        self._stopping, self._skip_notice = asyncio.Event(), asyncio.Event()
        self._executor = ThreadPoolExecutor(settings.compute_threads or os.cpu_count() or 1, thread_name_prefix="ort")
        self.receive_limit, self.send_limit = message_limits(settings, [m.manifest for m in self.opened])
        self._server = grpc.aio.server(
            interceptors=interceptors,
            maximum_concurrent_rpcs=2 * settings.concurrent_rpcs,  # a backstop: status.py's limit is the one counted
            options=[
                ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
                ("grpc.max_receive_message_length", self.receive_limit),
                ("grpc.max_send_message_length", self.send_limit),
            ]
        )
        wire.add_service(self._server, pb_grpc.add_InferenceServicer_to_server, self.servicer, SERVICE)
        self.oip = oip.OpenInferenceServicer(settings)
        oip.add_to_server(self._server, self.oip)
        wire.add_service(self._server, health_pb2_grpc.add_HealthServicer_to_server, self.health,
                         health_pb2.DESCRIPTOR.services_by_name["Health"])  # fmt: skip
        if settings.reflection:
            reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server)
        # The same health servicer on a plaintext port of its own, for probes that cannot speak TLS.
        self._health_server = None
        self.health_port: int | None = None
        if settings.health_port >= 0:
            # SO_REUSEPORT as on the gRPC port: shared by the workers, each answering for itself; check_ports
            # makes sure no other process holds it.
            reuseport = 1 if settings.workers > 1 else 0
            self._health_server = grpc.aio.server(maximum_concurrent_rpcs=HEALTH_CONCURRENT_RPCS,
                                                  options=[("grpc.so_reuseport", reuseport)])  # fmt: skip
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)

    async def start(self) -> None:
        """Bind, answer NOT_SERVING while models load and warm up, then SERVING."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        settings = self.settings
        try:  # both ports bound before either server starts: a failure leaves nothing running
            self.port = self._bind("port", lambda: security.add_port(self._server, settings, self._certificates))
            if self._health_server is not None:
                address = f"{settings.host}:{settings.health_port}"
                self.health_port = self._bind("health_port", lambda: self._health_server.add_insecure_port(address))
        except ConfigError:
            self._executor.shutdown(wait=False)
            raise
        await self._server.start()
        if self._health_server is not None:
            await self._health_server.start()
        loop = asyncio.get_running_loop()
        registry = ModelRegistry(self.settings, self._executor, self.opened.state, self._refusal)
        try:
            models = await loop.run_in_executor(None, registry.warm_up, self.opened)
        except BaseException:
            await self._server.stop(0)
            self._executor.shutdown(wait=False)
            raise
        self.opened.clear()  # the registry holds what it serves: a version retired later must not stay open here
        registry.serve(models)
        self.registry = registry
        self.servicer.serve(self.registry)
        self.oip.serve(self.registry)
        self._watcher = RepositoryWatcher(self.registry, self.settings.repository_poll_seconds)
        self._watcher.start()
        if self._stopping.is_set():  # SIGTERM during the warm-up: never report SERVING, go straight to the drain
            return
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s on %s:%d (pid %d)", sorted(self.registry.models), self.settings.host, self.port, os.getpid())

    _watcher: RepositoryWatcher | None = None  # set by start

    def _bind(self, name: str, add) -> int:
        """The port add() bound for settings.<name>, or check_ports' one line: check_ports found the port
        free, so this fails only where another process took it since."""
        try:
            return add()
        except RuntimeError:  # gRPC says only "Failed to bind"; binding it once more says why
            host, port = self.settings.host, getattr(self.settings, name)
            failure = _probe(host, port)
            raise _cannot_bind(name, host, port, _reason(failure) if failure else "gRPC cannot bind it") from None

    def request_rescan(self) -> None:
        """SIGHUP: rescan the repository now (after the rescan running, if one is). Before start has loaded
        the models there is nothing to do: the watcher's first rescan looks at the repository again."""
        if self._watcher is not None:
            self._watcher.rescan_soon()

    async def stop_watching(self) -> None:
        """Stop rescanning the repository: no version comes or goes after this (the first step of stop)."""
        if self._watcher is not None:
            await self._watcher.stop()

    def _refusal(self, manifest: Manifest) -> str | None:
        """Why a version found on a rescan cannot be served here, or None: gRPC's message limits are fixed at start."""
        receive, send = message_limits(self.settings, [manifest])
        if receive <= self.receive_limit and send <= self.send_limit:
            return None
        return (f"needs gRPC message limits of {receive:,} bytes received and {send:,} sent, more than the "
                f"{self.receive_limit:,} and {self.send_limit:,} this server started with; restart the server to serve it")

    async def _set_health(self, status) -> None:
        for service in ("", SERVICE_NAME, oip.SERVICE_NAME):
            await self.health.set(service, status)
        self.oip.ready = status == health_pb2.HealthCheckResponse.SERVING

    def request_stop(self) -> None:
        """SIGTERM/SIGINT: the first starts the drain, a second skips what is left of its notice."""
        if self._stopping.is_set():
            self._skip_notice.set()
        self._stopping.set()

    async def wait_and_stop(self) -> None:
        await self._stopping.wait()
        await self.stop()

    async def stop(self) -> None:
        """The drain. Health says NOT_SERVING at once, to Check and to every Watch, while calls are still
        served for drain_notice_seconds, so balancers and probes see it before anything is refused. Then
        new calls get UNAVAILABLE (they never reach a model), the batchers run what they hold without
        waiting to fill, and calls already inside finish within drain_seconds. Only then does the gRPC
        server stop: stopping it earlier would cancel calls it had taken in but not yet handed over."""
        await self.stop_watching()
        loop = asyncio.get_running_loop()
        settings = self.settings
        self.oip.ready = False
        await self.health.enter_graceful_shutdown()
        if settings.drain_notice_seconds > 0:
            log.info("draining: health NOT_SERVING, still serving for %.1f s (a second signal skips this)",
                     settings.drain_notice_seconds)  # fmt: skip
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._skip_notice.wait(), settings.drain_notice_seconds)
        status.stop_accepting()
        models = self.registry.all() if self.registry else []
        for model in models:
            model.drain()
        log.info("draining: new calls get UNAVAILABLE; finishing %d in flight (up to %.1f s)", memory.in_flight(),
                 settings.drain_seconds)  # fmt: skip
        # Callers still sending are told UNAVAILABLE, and most move on (the calls they would send meanwhile
        # would be cancelled rather than refused by a stopped server). Once nothing is in flight, stop when
        # they have gone quiet, or after DRAIN_REFUSING_SECONDS for callers that keep retrying on their
        # connection: only the stop's GOAWAY sends those elsewhere.
        start = loop.time()
        end = start + settings.drain_seconds

        def draining() -> bool:
            if memory.in_flight():
                return True
            return status.seconds_since_refused() < DRAIN_QUIET_SECONDS and loop.time() - start < DRAIN_REFUSING_SECONDS

        while draining() and loop.time() < end:
            await asyncio.sleep(DRAIN_POLL_SECONDS)
        # What is left after the grace is streams such as health Watch, or calls past drain_seconds: cancelled.
        await self._server.stop(STOP_GRACE_SECONDS)
        if self._health_server is not None:
            await self._health_server.stop(0)
        for model in models:
            await model.close()
        self._executor.shutdown(wait=False)
        log.info("stopped")


async def _serve_worker(settings: Settings, stop_signals=(signal.SIGTERM, signal.SIGINT)) -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # while models load: a SIGHUP then must not end the process
    server = Server(settings)
    loop = asyncio.get_running_loop()
    for sig in stop_signals:
        loop.add_signal_handler(sig, server.request_stop)
    loop.add_signal_handler(signal.SIGHUP, server.request_rescan)  # a rescan, not the default exit
    await server.start()
    await server.wait_and_stop()


def _worker_main(settings: Settings) -> None:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s worker {os.getpid()}: %(message)s")
    # Ctrl-C reaches the whole group and the parent forwards it as SIGTERM: one signal, not a second one
    # that would skip the drain's notice.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    memory.configure_allocator()  # before any thread allocates: see service/memory.py
    try:
        asyncio.run(_serve_worker(settings, stop_signals=(signal.SIGTERM,)))
    except VaeserveError as err:
        log.error("%s", err)
        raise SystemExit(2) from None


def start_metrics_server(settings: Settings, registry=None) -> int | None:
    """Prometheus text exposition on settings.metrics_port; returns the bound port."""
    if settings.metrics_port < 0:
        return None
    from prometheus_client import REGISTRY, start_http_server

    host = _http_host(settings.metrics_host)
    try:
        server, _ = start_http_server(settings.metrics_port, addr=host, registry=registry or REGISTRY)
    except OSError as err:  # taken since check_ports looked, or a host that does not resolve
        raise _cannot_bind("metrics_port", settings.metrics_host, settings.metrics_port, _reason(err)) from None
    port = server.server_port
    log.info("metrics on http://%s:%d/metrics", host, port)
    return port


def _http_host(host: str) -> str:
    return "::" if host in ("[::]", "::") else host.strip("[]")


PORTS = (("port", "host"), ("health_port", "host"), ("metrics_port", "metrics_host"))  # (port setting, its host's)
REFUSED = (errno.EADDRINUSE, errno.EACCES)  # a port someone holds, or one below 1024


def check_ports(settings: Settings) -> None:
    """ConfigError, one line, when the gRPC, health or metrics port cannot be bound: before any model is
    read, not after. Each fixed port is bound and listened on here, all held until the last is checked (two
    settings on one port are caught too), with SO_REUSEADDR as the servers bind them (connections of a
    previous server in TIME_WAIT do not count) and without SO_REUSEPORT: the workers bind with it, and
    Linux would let them share the port with any process of the same user that set it too (another
    `vaeserve serve --workers N`), the calls split between two servers. Without it, any listener on the
    port refuses the bind. Called once, before the workers: in a worker, the others hold the port."""
    held: dict[int, str] = {}
    with contextlib.ExitStack() as sockets:
        for name, host_setting in PORTS:
            host, port = getattr(settings, host_setting), getattr(settings, name)
            if port <= 0:  # 0 picks a free port, -1 is none
                continue
            failure = _probe(host, port, sockets)
            if isinstance(failure, socket.gaierror):  # the host's fault, not the port's
                raise _cannot_bind(host_setting, host, port, _reason(failure))
            if failure is not None and failure.errno == errno.EADDRINUSE and port in held:
                raise _cannot_bind(name, host, port, f"{held[port]} is {port} too; give each a port of its own")
            if failure is not None:
                raise _cannot_bind(name, host, port, _reason(failure))
            held[port] = name


def _probe(host: str, port: int, sockets: contextlib.ExitStack | None = None) -> OSError | None:
    """Why host:port cannot be bound, or None when it can. Every address the host resolves to is tried
    (localhost: 127.0.0.1 and ::1), as gRPC binds them all; one in use is enough to refuse, while an
    address family this machine lacks is not, as long as another address binds. The sockets are closed
    at once, or stay open in `sockets` when given."""
    try:
        addresses = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        return err
    with contextlib.ExitStack() as own:
        failure, bound = None, False
        for family, kind, proto, _, address in addresses:
            try:
                sock = (own if sockets is None else sockets).enter_context(socket.socket(family, kind, proto))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(address)
                sock.listen()
                bound = True
            except OSError as err:
                if err.errno in REFUSED:
                    return err
                failure = failure or err
        return None if bound else failure


def _reason(err: OSError) -> str:
    text = err.strerror or str(err)
    return text[:1].lower() + text[1:]


def _cannot_bind(name: str, host: str, port: int, reason: str) -> ConfigError:
    host = host.strip("[]")
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    flag = "--" + name.replace("_", "-")
    return ConfigError(f"cannot bind {address} ({name}, {Settings.env_name(name)} / {flag}): {reason}")


def serve(settings: Settings) -> int:
    """Run the server until SIGTERM/SIGINT; 0 after a clean drain."""
    check_ports(settings)
    if settings.workers == 1:
        memory.configure_allocator()  # before any thread allocates: see service/memory.py
        start_metrics_server(settings)
        asyncio.run(_serve_worker(settings))
        return 0
    return _serve_workers(settings)


def _serve_workers(settings: Settings) -> int:
    import multiprocessing

    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the workers are there to pass it on to
    if not scan_repository(settings.repository):  # fail once here rather than in every worker
        raise no_valid_version(settings.repository)

    # Multiprocess metrics: every worker writes its values under this folder (the variable must be
    # set before prometheus_client is imported in a worker), and the parent's /metrics sums them.
    own_dir = None
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        own_dir = tempfile.TemporaryDirectory(prefix="vaeserve-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = own_dir.name
    from prometheus_client import CollectorRegistry, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    start_metrics_server(settings, registry)

    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_worker_main, args=(settings,), name=f"vaeserve-worker-{i}") for i in range(settings.workers)]
    for worker in workers:
        worker.start()

    def forward(signum, frame):
        for worker in workers:
            if worker.is_alive():
                os.kill(worker.pid, signal.SIGHUP if signum == signal.SIGHUP else signal.SIGTERM)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # SIGHUP: every worker rescans
        signal.signal(signum, forward)
    codes = []
    for worker in workers:
        worker.join()
        multiprocess.mark_process_dead(worker.pid)
        codes.append(worker.exitcode)
        if worker.exitcode != 0:
            log.error("worker %d exited with %s", worker.pid, worker.exitcode)
    if own_dir is not None:
        own_dir.cleanup()
    if all(code == 2 for code in codes):  # every worker found nothing to serve, as one process would
        return 2
    return 1 if any(codes) else 0
