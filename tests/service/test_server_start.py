"""`vaeserve serve` and the ports it cannot bind: one line naming the address, the port and its setting,
exit status 2 and no traceback, before any model is read; with --workers too, whose SO_REUSEPORT would let
the workers share a port with another process that set it. And `vaeserve serve --help`."""

import os
import socket
import subprocess
import sys
import time

import pytest

from vaeserve.benchmarks import harness


def hold(port: int = 0, reuseport: bool = False) -> socket.socket:
    """A listener on 127.0.0.1:port, as another program holding it would be."""
    sock = socket.socket()
    if reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


def refused(name: str, port: int, reason: str = "address already in use") -> str:
    env, flag = "VAESERVE_" + name.upper(), "--" + name.replace("_", "-")
    return f"vaeserve serve: error: cannot bind 127.0.0.1:{port} ({name}, {env} / {flag}): {reason}\n"


@pytest.mark.parametrize(
    "name, workers, reuseport",
    [
        ("port", 1, False),
        ("port", 2, False),
        # Another `vaeserve serve --workers N` of this user: the workers' own bind (SO_REUSEPORT) would join it.
        ("port", 2, True),
        ("metrics_port", 1, False),
        ("metrics_port", 2, False),
        ("health_port", 1, False),
    ],
)
def test_a_port_in_use_is_one_line_and_exit_2_before_any_model_is_read(
    model_repository, start_server, tmp_path, name, workers, reuseport
):
    with hold(reuseport=reuseport) as held:
        port = held.getsockname()[1]
        server = start_server(model_repository, log=tmp_path / "server.log", workers=workers, **{name: port})
        try:
            code = server.process.wait(30)
        finally:
            server.stop()
    # Nothing else: no metrics server, no model loaded, no worker started.
    assert (code, server.log_text()) == (2, refused(name, port))


def test_two_settings_on_one_port_are_one_line(model_repository, start_server, tmp_path):
    port = harness.free_port()
    server = start_server(model_repository, log=tmp_path / "server.log", port=port, metrics_port=port)
    try:
        code = server.process.wait(30)
    finally:
        server.stop()
    reason = f"port is {port} too; give each a port of its own"
    assert (code, server.log_text()) == (2, refused("metrics_port", port, reason))


# As if another process took the port between the check and the bind: the bind itself says the same line.
TAKEN_AFTER_THE_CHECK = """import sys
from vaeserve.service import server
server.check_ports = lambda settings: None
from vaeserve.cli import main
sys.exit(main(["serve"]))
"""


@pytest.mark.parametrize("workers", [1, 2])
def test_a_port_taken_after_the_check_is_the_same_line(model_repository, workers):
    with hold() as held:
        port = held.getsockname()[1]
        env = dict(os.environ, VAESERVE_REPOSITORY=str(model_repository), VAESERVE_HOST="127.0.0.1",
                   VAESERVE_PORT=str(port), VAESERVE_METRICS_PORT="-1", VAESERVE_WORKERS=str(workers))  # fmt: skip
        run = subprocess.run([sys.executable, "-c", TAKEN_AFTER_THE_CHECK], env=env, capture_output=True, text=True,
                             timeout=60)  # fmt: skip
    assert run.returncode == 2 and "Traceback" not in run.stderr
    line = refused("port", port).removeprefix("vaeserve serve: error: ")
    # One process: the CLI's line. Workers: each logs it and exits 2, and so does the parent.
    assert run.stderr.count(line) == workers, run.stderr


def test_the_metrics_server_says_the_same_line_when_its_port_is_taken():
    from vaeserve.errors import ConfigError
    from vaeserve.service.server import start_metrics_server
    from vaeserve.service.settings import Settings

    with hold() as held:
        port = held.getsockname()[1]
        with pytest.raises(ConfigError) as err:
            start_metrics_server(Settings(metrics_port=port))
    assert f"{err.value}\n" == refused("metrics_port", port).removeprefix("vaeserve serve: error: ")


def test_a_port_whose_last_connections_are_in_time_wait_is_not_refused(model_repository, start_server, tmp_path):
    """A server that stopped closed its connections first, so they sit in TIME_WAIT on its port for a minute:
    the check binds with SO_REUSEADDR, as gRPC and the metrics server do, and a new server starts at once."""
    with socket.socket() as listener:  # as gRPC's: SO_REUSEADDR, which its connections inherit
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as caller:
            accepted, _ = listener.accept()
            accepted.close()  # the server's side closes first: its end goes to TIME_WAIT
            caller.recv(1)
    server = start_server(model_repository, log=tmp_path / "server.log", port=port)
    server.port = port  # start_server records the port it picked, not the one given
    try:
        server.wait_serving()
    finally:
        assert server.stop() == 0


def test_workers_share_the_health_port_as_they_share_the_grpc_port(model_repository, start_server, tmp_path):
    from grpc_health.v1 import health_pb2

    health_port = harness.free_port()
    server = start_server(model_repository, log=tmp_path / "server.log", workers=2, health_port=health_port)
    try:
        server.wait_serving()
        for _ in range(200):  # both workers up, not only the one that answered first
            if server.log_text().count("serving ['cvae', 'ppca', 'vae']") == 2:
                break
            time.sleep(0.05)
        probe = harness.ServerProcess(server.process, health_port, server.metrics_port)
        assert probe.health() == health_pb2.HealthCheckResponse.SERVING
    finally:
        assert server.stop() == 0
    assert server.log_text().count("serving ['cvae', 'ppca', 'vae']") == 2 and "ERROR" not in server.log_text()


def test_serve_help_has_a_description_an_example_and_help_for_every_flag(capsys):
    from vaeserve.cli import main
    from vaeserve.service.settings import describe

    with pytest.raises(SystemExit) as exit:
        main(["serve", "--help"])
    text = capsys.readouterr().out
    assert exit.value.code == 0 and text.startswith("usage: vaeserve serve")
    assert "\nexample:\n  vaeserve serve --repository models --port 50051 --metrics-port 8000\n" in text

    def words(s: str) -> str:  # argparse wraps help at spaces and after hyphens: compare without either
        return "".join(s.split())

    assert words("Serve every valid model version in a repository over gRPC") in words(text)
    assert words("A port in use, or a repository with no valid version: one line, exit status 2.") in words(text)
    for name, env, default, doc, _ in describe():  # every flag, with the setting's own words as its help
        flag = "--" + name.replace("_", "-")
        assert words(f"{flag} {name.upper()} {doc} [{env}; default {default}]") in words(text)
