"""TLS, mTLS and bearer tokens against real servers on loopback, with real certificates (trustme), and the
reloading pieces in-process on real files. Four server subprocesses in all: TLS with tokens, mTLS
without reflection, and one each for rotating certificates and rotating tokens."""

import asyncio
import hashlib
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import trustme
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from vaeserve.benchmarks import harness
from vaeserve.oip.v2 import predict_pb2 as oip_pb
from vaeserve.service import oip, security
from vaeserve.service.client import Client, channel_credentials
from vaeserve.v1 import vaeserve_pb2 as pb

MODELS = {"cvae": [1], "ppca": [1], "vae": [1]}
TOKEN, HASHED_TOKEN, WRONG_TOKEN = "token-alpha-1f9c", "token-beta-7d2e", "wrong-token-55aa"
SERVING = health_pb2.HealthCheckResponse.SERVING
UNAUTHENTICATED, UNAVAILABLE = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAVAILABLE
SETTLE_SECONDS = 5.0  # bound on waiting for the server to see a rewritten token file (it looks once a second)


def sha256_hex(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def bearer(token: str) -> tuple:
    return (("authorization", f"Bearer {token}"),)


def replace_file(path: Path, data: bytes) -> None:
    """Write `path` whole at once, by a rename, as a secret mount or a careful operator does."""
    part = path.with_name(path.name + ".part")
    part.write_bytes(data)
    os.replace(part, path)


@dataclass
class Pki:
    """A CA (its certificate in ca_file) and a server certificate it signed for 127.0.0.1 and localhost."""

    ca: trustme.CA
    ca_file: Path
    cert: Path
    key: Path

    @classmethod
    def make(cls, folder: Path, name: str = "server") -> "Pki":
        ca = trustme.CA()
        ca_file = folder / f"{name}-ca.pem"
        ca.cert_pem.write_to_path(ca_file)
        pki = cls(ca, ca_file, folder / f"{name}.pem", folder / f"{name}.key")
        pki.issue(pki.ca)
        return pki

    def issue(self, ca: trustme.CA) -> None:
        """Replace the server's certificate and key with a new pair signed by `ca`, key first."""
        issued = ca.issue_cert("127.0.0.1", "localhost")
        replace_file(self.key, issued.private_key_pem.bytes())
        replace_file(self.cert, b"".join(blob.bytes() for blob in issued.cert_chain_pems))


def client_certificate(ca: trustme.CA, folder: Path, name: str) -> tuple[Path, Path]:
    issued = ca.issue_cert(f"{name}@clients.example")
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    issued.cert_chain_pems[0].write_to_path(cert)
    issued.private_key_pem.write_to_path(key)
    return cert, key


def code_of(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def list_services(channel, metadata=None) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                          metadata=metadata, timeout=5)  # fmt: skip
    return sorted(service.name for response in responses for service in response.list_services_response.service)


def score_rows(client: Client, rows) -> None:
    x, _ = rows
    result = client.score("vae", x)
    assert result.neg_elbo.shape == (len(x),) and np.isfinite(result.neg_elbo).all()


# --- TLS with tokens


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> Pki:
    return Pki.make(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_server(model_repository, tls):
    tokens = tls.ca_file.with_name("tokens")
    tokens.write_text(f"# accepted tokens\n{TOKEN}\n\nsha256:{sha256_hex(HASHED_TOKEN).upper()}\n")
    server = harness.start_server(model_repository, log=tls.ca_file.with_name("server.log"), tls_cert=tls.cert,
                                  tls_key=tls.key, auth_tokens_file=tokens)  # fmt: skip
    try:
        server.wait_serving(credentials=channel_credentials(tls.ca_file))
        yield server
    finally:
        server.stop()


def test_tls_port_refuses_plaintext(tls_server, tls, rows):
    with Client(tls_server.target, timeout=5, token=TOKEN) as plaintext:
        assert code_of(plaintext.models) == UNAVAILABLE
    with Client(tls_server.target, timeout=5, token=TOKEN, tls=True) as system_roots:  # TLS on, our CA not trusted
        with pytest.raises(grpc.RpcError) as refused:
            system_roots.models()
        assert refused.value.code() == UNAVAILABLE and "CERTIFICATE_VERIFY_FAILED" in refused.value.details()
    with Client(tls_server.target, ca=tls.ca_file, token=TOKEN) as client:
        assert client.models() == MODELS
        score_rows(client, rows)


def test_every_rpc_needs_a_token(tls_server, tls):
    unauthenticated = ("vaeserve_unauthenticated_total", ())
    refused_before = tls_server.metrics().get(unauthenticated, 0.0)
    refusals = [None, bearer(WRONG_TOKEN), (("authorization", TOKEN),),  # no scheme
                bearer(f"sha256:{sha256_hex(HASHED_TOKEN)}")]  # the digest is not the token  # fmt: skip
    refused = 0
    with grpc.secure_channel(tls_server.target, channel_credentials(tls.ca_file)) as channel:
        services = [(pb.DESCRIPTOR.services_by_name["Inference"], "vaeserve.v1.Inference"),
                    (oip_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"], oip.SERVICE_NAME)]  # fmt: skip
        for method, service in [(method, name) for descriptor, name in services for method in descriptor.methods]:
            request = message_factory.GetMessageClass(method.input_type)()
            if method.client_streaming:  # one message, then read the whole stream
                stream = channel.stream_stream(f"/{service}/{method.name}", request_serializer=type(request).SerializeToString)
                call = lambda request, stream=stream, **kwargs: list(stream(iter([request]), **kwargs))  # noqa: E731
            else:
                call = channel.unary_unary(f"/{service}/{method.name}", request_serializer=type(request).SerializeToString)
            for metadata in refusals:
                with pytest.raises(grpc.RpcError) as err:
                    call(request, metadata=metadata, timeout=5)
                assert (err.value.code(), err.value.details()) == (UNAUTHENTICATED, security.REFUSAL), method.name
                refused += 1
            for token in (TOKEN, HASHED_TOKEN):
                # Past the token, an empty request reaches the servicer, which finds fault with it or answers.
                assert code_of(lambda: call(request, metadata=bearer(token), timeout=5)) != UNAUTHENTICATED, method.name
        assert code_of(lambda: channel.unary_unary("/vaeserve.v1.Inference/Nope")(b"", timeout=5)) == grpc.StatusCode.UNIMPLEMENTED

        for metadata in refusals:
            with pytest.raises(grpc.RpcError) as err:
                list_services(channel, metadata)
            assert (err.value.code(), err.value.details()) == (UNAUTHENTICATED, security.REFUSAL)
            refused += 1
        assert {"vaeserve.v1.Inference", "grpc.health.v1.Health"} <= set(list_services(channel, bearer(TOKEN)))

        health = health_pb2_grpc.HealthStub(channel)  # probes carry no token
        assert health.Check(health_pb2.HealthCheckRequest(service="vaeserve.v1.Inference"), timeout=5).status == SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=5)
        assert next(watch).status == SERVING
        watch.cancel()
    assert tls_server.metrics()[unauthenticated] == refused_before + refused
    assert WRONG_TOKEN not in tls_server.log_text()


def test_cli_client_with_tls_and_token(tls_server, tls):
    command = [sys.executable, "-m", "vaeserve.cli", "client", "models", "--host", "127.0.0.1",
               "--port", str(tls_server.port), "--ca", str(tls.ca_file)]  # fmt: skip
    environ = {k: v for k, v in os.environ.items() if not k.startswith("VAESERVE_")}
    listing = [["model", "versions"]] + [[name, ", ".join(map(str, versions))] for name, versions in sorted(MODELS.items())]

    def run(*flags, **variables):
        return subprocess.run([*command, *flags], env=environ | variables, capture_output=True, text=True, timeout=60)

    for done in (run("--token", TOKEN), run(VAESERVE_TOKEN=HASHED_TOKEN)):
        assert done.returncode == 0, done.stderr
        assert [line.split(None, 1) for line in done.stdout.splitlines()] == listing
    refused = run("--token", WRONG_TOKEN)
    assert refused.returncode == 1
    assert refused.stderr.strip() == f"vaeserve client: UNAUTHENTICATED: {security.REFUSAL}"


# --- mTLS, reflection off


@pytest.fixture(scope="module")
def mtls(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mtls")
    pki, clients, strangers = Pki.make(folder), trustme.CA(), trustme.CA()
    clients.cert_pem.write_to_path(folder / "clients-ca.pem")
    return pki, folder / "clients-ca.pem", client_certificate(clients, folder, "member"), client_certificate(strangers, folder, "stranger")


@pytest.fixture(scope="module")
def mtls_server(model_repository, mtls):
    pki, clients_ca, member, _ = mtls
    server = harness.start_server(model_repository, tls_cert=pki.cert, tls_key=pki.key, tls_client_ca=clients_ca,
                                  reflection="false", health_port=harness.free_port())  # fmt: skip
    cert, key = member
    try:
        server.wait_serving(credentials=channel_credentials(pki.ca_file, cert, key))
        yield server
    finally:
        server.stop()


def test_mtls_needs_a_certificate_from_the_client_ca(mtls_server, mtls, rows):
    pki, _, (cert, key), (stranger_cert, stranger_key) = mtls
    with Client(mtls_server.target, timeout=5, ca=pki.ca_file) as anonymous:
        assert code_of(anonymous.models) == UNAVAILABLE
    with Client(mtls_server.target, timeout=5, ca=pki.ca_file, cert=stranger_cert, key=stranger_key) as stranger:
        assert code_of(stranger.models) == UNAVAILABLE
    with Client(mtls_server.target, ca=pki.ca_file, cert=cert, key=key) as member:
        assert member.models() == MODELS
        score_rows(member, rows)


def test_reflection_off(mtls_server, mtls):
    pki, _, (cert, key), _ = mtls
    with grpc.secure_channel(mtls_server.target, channel_credentials(pki.ca_file, cert, key)) as channel:
        assert code_of(lambda: list_services(channel)) == grpc.StatusCode.UNIMPLEMENTED
        assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING


def test_health_port_answers_plaintext_probes_and_nothing_else(mtls_server):
    with grpc.insecure_channel(f"127.0.0.1:{mtls_server.settings['health_port']}") as channel:
        assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING
        score = channel.unary_unary("/vaeserve.v1.Inference/ListModels", request_serializer=pb.ListModelsRequest.SerializeToString)
        assert code_of(lambda: score(pb.ListModelsRequest(), timeout=5)) == grpc.StatusCode.UNIMPLEMENTED


# --- Rotation without a restart


def test_certificates_rotate_without_restart(model_repository, start_server, tmp_path):
    pki, renewed = Pki.make(tmp_path), trustme.CA()
    renewed_ca = tmp_path / "renewed-ca.pem"
    renewed.cert_pem.write_to_path(renewed_ca)
    server = start_server(model_repository, log=tmp_path / "server.log", tls_cert=pki.cert, tls_key=pki.key)

    def models(ca: Path):
        with Client(server.target, timeout=5, ca=ca) as client:
            return client.models()

    try:
        server.wait_serving(credentials=channel_credentials(pki.ca_file))
        assert models(pki.ca_file) == MODELS
        pki.key.write_bytes(b"-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEI")  # cut short: the old pair stays
        assert models(pki.ca_file) == MODELS
        pki.issue(renewed)
        assert models(renewed_ca) == MODELS
        assert code_of(lambda: models(pki.ca_file)) == UNAVAILABLE
        assert server.process.poll() is None
        log = server.log_text()
        assert log.count("TLS certificates: keeping what was read before") == 1
        assert "TLS certificates: read again" in log
    finally:
        server.stop()


def test_token_file_rotates(model_repository, start_server, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("old-token\n")
    server = start_server(model_repository, log=tmp_path / "server.log", auth_tokens_file=tokens)

    def code(token):  # tokens over plaintext, as on loopback
        with Client(server.target, timeout=5, token=token) as client:
            return code_of(client.models)

    def settles(token, expected):
        end = time.monotonic() + SETTLE_SECONDS
        while code(token) != expected:
            assert time.monotonic() < end, f"the server did not take the new token file in {SETTLE_SECONDS} s"
            time.sleep(0.1)

    try:
        server.wait_serving()  # health needs no token
        assert (code("old-token"), code("new-token")) == (grpc.StatusCode.OK, UNAUTHENTICATED)
        replace_file(tokens, b"new-token\n")
        settles("old-token", UNAUTHENTICATED)
        assert code("new-token") == grpc.StatusCode.OK

        replace_file(tokens, b"sha256:not-hex\n")  # unreadable: the tokens before it stay
        end = time.monotonic() + SETTLE_SECONDS
        while "auth_tokens_file: keeping what was read before" not in server.log_text():  # calls make it look
            assert code("new-token") == grpc.StatusCode.OK and time.monotonic() < end
            time.sleep(0.1)
        assert code("new-token") == grpc.StatusCode.OK

        replace_file(tokens, b"# nobody\n")  # no token at all: every call is refused
        settles("new-token", UNAUTHENTICATED)
        assert "holds no token: every call but health is refused" in server.log_text()
        assert server.health() == SERVING
    finally:
        server.stop()


# --- In-process, on real files


def test_read_tokens(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"  # comment\n\n{TOKEN}  \nsha256:{sha256_hex(HASHED_TOKEN).upper()}\n")
    assert security.read_tokens(path) == (hashlib.sha256(TOKEN.encode()).digest(), hashlib.sha256(HASHED_TOKEN.encode()).digest())
    for text, problem in ((f"{TOKEN}\nsha256:abc\n", "line 2: sha256: takes 64 hex digits"),
                          (f"{TOKEN} # inline\n", "line 1: a token has no spaces")):  # fmt: skip
        path.write_text(text)
        with pytest.raises(ValueError, match=problem) as err:
            security.read_tokens(path)
        assert TOKEN not in str(err.value)


def test_read_tokens_takes_a_bom_and_crlf_and_refuses_what_is_not_printable_ascii(tmp_path):
    path = tmp_path / "tokens"
    path.write_bytes(f"\ufeffsha256:{sha256_hex(HASHED_TOKEN)}\r\n{TOKEN}\r\n".encode())
    assert security.read_tokens(path) == (hashlib.sha256(HASHED_TOKEN.encode()).digest(), hashlib.sha256(TOKEN.encode()).digest())
    path.write_text(f"{TOKEN}\ntoken-\u00e9t\u00e9\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 2: a token is printable ASCII"):
        security.read_tokens(path)


def test_token_file_caught_mid_write_is_not_taken_and_a_deleted_one_refuses_everything(tmp_path, monkeypatch):
    monkeypatch.setattr(security, "TOKEN_LOOK_SECONDS", 0.0)  # look at every call
    path = tmp_path / "tokens"
    path.write_text(f"{TOKEN}\n{HASHED_TOKEN}\n")
    tokens = security.TokenFile(path)
    assert tokens.accepts(TOKEN) and tokens.accepts(HASHED_TOKEN)
    path.write_text(TOKEN[:5])  # a write caught halfway by one look (each call looks)
    assert tokens.accepts(TOKEN)
    path.write_text(f"{HASHED_TOKEN}\n")  # the write done: taken once two looks agree
    assert tokens.accepts(TOKEN)
    assert not tokens.accepts(TOKEN) and tokens.accepts(HASHED_TOKEN) and not tokens.accepts(TOKEN[:5])
    path.unlink()  # revoked by removing the file: nothing is accepted until it is back
    assert not tokens.accepts(HASHED_TOKEN)


def test_certificate_fetcher_follows_the_files(tmp_path, caplog):
    pki = Pki.make(tmp_path)
    files = security.CertificateFiles(pki.cert, pki.key)
    assert files.fetch() is None
    pki.key.write_bytes(pki.key.read_bytes()[:60])
    with caplog.at_level("ERROR", logger="vaeserve.service.security"):
        assert files.fetch() is None and files.fetch() is None
    assert len(caplog.records) == 1 and "not a PEM certificate chain and its unencrypted key" in caplog.text

    # Handshakes on several threads see the change at once: exactly one gets the new configuration.
    pki.issue(trustme.CA())
    got, start = [], threading.Barrier(8)

    def handshake():
        start.wait()
        got.append(files.fetch())

    threads = [threading.Thread(target=handshake) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(isinstance(config, grpc.ServerCertificateConfiguration) for config in got) == 1
    assert got.count(None) == 7 and files.fetch() is None


def test_refusal_has_the_kind_of_the_handler(tmp_path):
    """Every kind of handler, through TokenAuth in a grpc.aio server: refused without a token, served with one."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN}\n")

    async def unary(request, context):
        return b"ok"

    async def stream(request, context):
        yield b"ok"

    handlers = {"UnaryUnary": grpc.unary_unary_rpc_method_handler(unary), "UnaryStream": grpc.unary_stream_rpc_method_handler(stream),
                "StreamUnary": grpc.stream_unary_rpc_method_handler(unary), "StreamStream": grpc.stream_stream_rpc_method_handler(stream)}  # fmt: skip

    async def scenario():
        server = grpc.aio.server(interceptors=[security.TokenAuth(security.TokenFile(tokens))])
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Kinds", handlers)])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                calls = {
                    "UnaryUnary": lambda m: channel.unary_unary("/test.Kinds/UnaryUnary")(b"x", metadata=m),
                    "UnaryStream": lambda m: channel.unary_stream("/test.Kinds/UnaryStream")(b"x", metadata=m).read(),
                    "StreamUnary": lambda m: channel.stream_unary("/test.Kinds/StreamUnary")(iter([b"x", b"y"]), metadata=m),
                    "StreamStream": lambda m: channel.stream_stream("/test.Kinds/StreamStream")(iter([b"x"]), metadata=m).read(),
                }
                outcome = {}
                for name, call in calls.items():
                    try:
                        await call(None)
                    except grpc.aio.AioRpcError as err:
                        outcome[name] = (err.code(), err.details(), await call(bearer(TOKEN)))
                return outcome
        finally:
            await server.stop(0)

    assert asyncio.run(scenario()) == {name: (UNAUTHENTICATED, security.REFUSAL, b"ok") for name in handlers}
