"""The image's health check script (deploy/docker/healthcheck.py), run as the image runs it, against a
real `vaeserve serve` with TLS and a plaintext health port: it picks the port and the credentials from
the server's own VAESERVE_* variables, verifies the certificate it should, and reports the drain.
(The plaintext main port is checked in test_prometheus_scrape.py, against that module's server.)"""

import datetime
import ipaddress
import subprocess
import sys
import time

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from deploy_support import DEPLOY
from vaeserve.benchmarks import harness
from vaeserve.service.client import channel_credentials

SCRIPT = DEPLOY / "docker" / "healthcheck.py"
SERVER_NAME = "vaeserve.test"
LOOPBACK = ipaddress.ip_address("127.0.0.1")


def self_signed(folder, name: str) -> tuple:
    """A self-signed certificate for `name` and 127.0.0.1 (no CA extensions) and its key: (cert, key) paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name), x509.IPAddress(LOOPBACK)]), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert, key_file = folder / "tls.crt", folder / "tls.key"
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    return cert, key_file


def health_check(**variables) -> subprocess.CompletedProcess:
    """The script with only these variables set, as the HEALTHCHECK runs it inside the container."""
    env = {"PATH": ""} | {name: str(value) for name, value in variables.items()}
    return subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return self_signed(tmp_path_factory.mktemp("tls"), SERVER_NAME)


@pytest.fixture(scope="module")
def server(model_repository, tls, tmp_path_factory):
    cert, key = tls
    # A long drain notice: test_drain_is_reported_on_the_health_port looks at health during it.
    running = harness.start_server(model_repository, log=tmp_path_factory.mktemp("vaeserve") / "serve.log",
                                   tls_cert=cert, tls_key=key, health_port=harness.free_port(),
                                   drain_notice_seconds=60, drain_seconds=2)  # fmt: skip
    try:
        running.wait_serving(credentials=channel_credentials(cert))
        yield running
    finally:
        assert running.stop() == 0, running.log_text()


def container_env(server, tls) -> dict:
    """What the image and deployment.yaml set, less the health port: every interface, TLS."""
    cert, key = tls
    return {"VAESERVE_HOST": "[::]", "VAESERVE_PORT": server.port, "VAESERVE_TLS_CERT": cert, "VAESERVE_TLS_KEY": key}


def test_health_port_is_asked_in_plaintext_whatever_the_main_port_speaks(server, tls):
    health_port = server.settings["health_port"]
    # With mTLS on the main port the check could not get in there; the health port needs no certificate.
    result = health_check(**container_env(server, tls), VAESERVE_TLS_CLIENT_CA=tls[0], VAESERVE_HEALTH_PORT=health_port)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"127.0.0.1:{health_port}: SERVING"


def test_tls_main_port_verified_against_the_servers_own_certificate(server, tls):
    result = health_check(**container_env(server, tls))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"127.0.0.1:{server.port}: SERVING"


@pytest.mark.parametrize("ca, name, serving", [
    ("own", SERVER_NAME, True),  # the name clients use, where the certificate does not carry 127.0.0.1
    ("own", "elsewhere.test", False),  # a name the certificate does not carry
    ("other", None, False),  # VAESERVE_HEALTHCHECK_CA replaces the server's certificate as the root
])  # fmt: skip
def test_tls_verification_follows_the_healthcheck_variables(server, tls, tmp_path, ca, name, serving):
    variables = container_env(server, tls)
    if ca == "other":
        other = tmp_path / "other-ca.pem"
        trustme.CA().cert_pem.write_to_path(other)
        variables["VAESERVE_HEALTHCHECK_CA"] = other
    if name is not None:
        variables["VAESERVE_HEALTHCHECK_SERVER_NAME"] = name
    result = health_check(**variables)
    assert (result.returncode == 0) is serving, result.stderr
    if not serving:
        # gRPC's own log lines come first; the script's line is the last.
        assert result.stderr.splitlines()[-1].startswith(f"127.0.0.1:{server.port}: UNAVAILABLE: "), result.stderr


def test_mtls_without_a_health_port_fails_saying_why(tls):
    cert, key = tls
    result = health_check(VAESERVE_TLS_CERT=cert, VAESERVE_TLS_KEY=key, VAESERVE_TLS_CLIENT_CA=cert)
    assert result.returncode == 1
    assert "set VAESERVE_HEALTH_PORT" in result.stderr


def test_drain_is_reported_on_the_health_port(server, tls):
    """Last: it stops the server. During the drain notice the health port says NOT_SERVING (what takes
    the pod out of the endpoints) while the process still runs; a second SIGTERM ends the notice."""
    health_port = server.settings["health_port"]
    server.process.terminate()
    end = time.monotonic() + 20
    while True:
        result = health_check(**container_env(server, tls), VAESERVE_HEALTH_PORT=health_port)
        if result.returncode != 0 or time.monotonic() > end:
            break
    assert result.returncode == 1
    assert result.stdout.strip() == f"127.0.0.1:{health_port}: NOT_SERVING"
    assert server.process.poll() is None  # still in the notice: calls are still served
    assert server.stop() == 0, server.log_text()
