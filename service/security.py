"""TLS for the gRPC port, and bearer tokens for its calls.

TLS: with tls_cert and tls_key the port speaks TLS only; with tls_client_ca as well, a client must present
a certificate that CA signed (mTLS). gRPC asks `CertificateFiles.fetch` before every TLS handshake, so
certificates rotated on disk serve new connections without a restart; open connections keep theirs.

Tokens: with auth_tokens_file, every call but grpc.health.v1 (probes carry no token) needs metadata
`authorization: Bearer <token>` with a token of the file, else UNAUTHENTICATED. The file holds tokens, or
`sha256:<hex>` digests of them so that it need not hold the secrets; it is read again when it changes.
"""

import hashlib
import hmac
import logging
import os
import re
import ssl
import threading
import time
from pathlib import Path

import grpc

from vaeserve.errors import ConfigError
from vaeserve.service import metrics
from vaeserve.service.settings import Settings

log = logging.getLogger(__name__)

OPEN_METHODS = "/grpc.health.v1.Health/"  # the prefix of the methods that need no token
REFUSAL = "missing or unknown bearer token; send metadata 'authorization: Bearer <token>'"
TOKEN_LOOK_SECONDS = 1.0  # how often a call may stat the token file
_HASHED = re.compile(r"sha256:([0-9a-fA-F]{64})")


def certificates(settings: Settings) -> "CertificateFiles | None":
    """The server's certificate files, read and checked now (ValueError naming the file), when tls_cert is set."""
    if settings.tls_cert is None:
        return None
    return CertificateFiles(settings.tls_cert, settings.tls_key, settings.tls_client_ca)


def add_port(server: grpc.aio.Server, settings: Settings, files: "CertificateFiles | None") -> int:
    """Bind settings.host:settings.port, TLS when there are certificate files; the port bound, 0 if none."""
    address = f"{settings.host}:{settings.port}"
    if files is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, files.credentials())


def interceptors(settings: Settings) -> list[grpc.aio.ServerInterceptor]:
    """Token auth when auth_tokens_file is set; none otherwise, so a call pays nothing for it."""
    return [] if settings.auth_tokens_file is None else [TokenAuth(TokenFile(settings.auth_tokens_file))]


def _signature(paths) -> tuple:
    """What changes when a file does: its inode (an atomic rename replaces it), mtime and size."""
    return tuple((s.st_ino, s.st_mtime_ns, s.st_size) for s in map(os.stat, paths))


class _Reloading:
    """A value read from files, read again by `refresh` when they change. A read that fails keeps the
    previous value and is logged once (until the problem changes). With `settle`, a change counts once
    the files have looked the same twice in a row, for files whose half-written state still reads (a
    token file cut short is a shorter list of tokens; a certificate cut short fails its check anyway).
    Files gone altogether give `when_missing` when it is set (tokens: refuse every call rather than keep
    a revoked one), else the previous value stays."""

    _MISSING = object()

    def __init__(self, what: str, paths, read, *, settle: bool = False, when_missing=_MISSING):
        self.what, self.paths, self._read, self._problem = what, tuple(paths), read, None
        self._settle, self._when_missing, self._pending = settle, when_missing, None
        try:
            self._signature = _signature(self.paths)
            self.value = read(*self.paths)
        except (OSError, ValueError) as err:
            raise ConfigError(f"{what}: {err}") from None

    def refresh(self) -> bool:
        """True when the files changed and `value` now holds what they say. Never raises."""
        try:
            signature = _signature(self.paths)
            if signature == self._signature:
                self._pending = None
                return False
            if self._settle and signature != self._pending:  # changed since the last look: look again first
                self._pending = signature
                return False
            value = self._read(*self.paths)
            if _signature(self.paths) != signature:
                return False  # written to while read: the next look reads them again
        except FileNotFoundError as err:
            if self._when_missing is self._MISSING:
                return self._failed(err)
            self._signature, self.value, self._pending = None, self._when_missing, None
            self._failed(err, "using none until it is back")
            return True
        except Exception as err:  # gRPC core threads call this, and so does every RPC: never raise into them
            return self._failed(err)
        self._signature, self.value, self._problem, self._pending = signature, value, None, None
        log.info("%s: read again from %s", self.what, ", ".join(map(str, self.paths)))
        return True

    def _failed(self, err: Exception, outcome: str = "keeping what was read before") -> bool:
        if str(err) != self._problem:
            self._problem = str(err)
            log.error("%s: %s: %s", self.what, outcome, err)
        return False


# TLS


def _no_password() -> bytes:
    return b""  # gRPC takes no key password; without this, ssl would prompt on the terminal for one


def certificate_configuration(cert: Path, key: Path, client_ca: Path | None = None) -> grpc.ServerCertificateConfiguration:
    """The files as a gRPC certificate configuration, checked first with the ssl module (a key that does
    not match its certificate, or a file cut short, is an error here rather than at every handshake).
    ssl reads the files again by path; _Reloading's second stat tells if they changed in between."""
    chain, private_key = cert.read_bytes(), key.read_bytes()
    roots = client_ca.read_bytes() if client_ca is not None else None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as err:
        raise ValueError(f"{cert} and {key} are not a PEM certificate chain and its unencrypted key ({err})") from None
    if roots is not None:
        try:
            context.load_verify_locations(cafile=client_ca)  # by path: bundles may carry non-ASCII comments
        except ssl.SSLError as err:
            raise ValueError(f"{client_ca} is not a PEM bundle of CA certificates ({err})") from None
    return grpc.ssl_server_certificate_configuration([(private_key, chain)], root_certificates=roots)


class CertificateFiles:
    """tls_cert, tls_key and tls_client_ca as gRPC server credentials that follow the files."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None = None):
        paths = (cert, key) if client_ca is None else (cert, key, client_ca)
        self.require_client_certificate = client_ca is not None
        self._files = _Reloading("TLS certificates", paths, certificate_configuration)
        self._lock = threading.Lock()  # handshakes on several gRPC threads may ask at once

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(self._files.value, self.fetch, self.require_client_certificate)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's certificate_configuration_fetcher: the new configuration when the files changed since
        the last handshake, else None (keep the current one)."""
        with self._lock:
            return self._files.value if self._files.refresh() else None


# Tokens


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def read_tokens(path: Path) -> tuple[bytes, ...]:
    """The sha256 digests of the tokens a token file accepts: one token, or `sha256:<64 hex>` (the digest
    of one), per line; blank lines and lines starting with # are skipped. Errors name the line, never
    its text, which may be a secret."""
    digests = []
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):  # -sig: a BOM is not a token
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not (line.isascii() and line.isprintable()):
            raise ValueError(f"{path} line {number}: a token is printable ASCII")
        if line.startswith("sha256:"):
            hashed = _HASHED.fullmatch(line)
            if hashed is None:
                raise ValueError(f"{path} line {number}: sha256: takes 64 hex digits")
            digests.append(bytes.fromhex(hashed[1]))
        elif re.search(r"\s", line):
            raise ValueError(f"{path} line {number}: a token has no spaces (a comment takes a whole line)")
        else:
            digests.append(_digest(line))
    return tuple(digests)


class TokenFile:
    """The accepted tokens, from auth_tokens_file, looked at again at most once a TOKEN_LOOK_SECONDS.
    Used on the event loop only."""

    def __init__(self, path: Path):
        self._file = _Reloading("auth_tokens_file", [path], read_tokens, settle=True, when_missing=())
        self._next_look = time.monotonic() + TOKEN_LOOK_SECONDS
        self._warn_if_empty()

    def accepts(self, token: str | None) -> bool:
        """Whether `token` is one of the file's. Every digest is compared, in constant time, so the time
        taken says nothing about which one matched or how much of it."""
        now = time.monotonic()
        if now >= self._next_look:
            self._next_look = now + TOKEN_LOOK_SECONDS
            if self._file.refresh():
                self._warn_if_empty()
        if token is None:
            return False
        presented, matched = _digest(token), False
        for accepted in self._file.value:
            matched |= hmac.compare_digest(presented, accepted)
        return matched

    def _warn_if_empty(self) -> None:
        if not self._file.value:
            log.warning("auth_tokens_file %s holds no token: every call but health is refused", self._file.paths[0])


def bearer_token(metadata) -> str | None:
    """The token of the first `authorization: Bearer <token>` entry (the scheme is case-insensitive)."""
    for key, value in metadata or ():
        if key == "authorization":
            scheme, _, token = value.partition(" ")
            return (token.strip() or None) if scheme.lower() == "bearer" else None
    return None


async def _refuse(request_or_iterator, context) -> None:
    metrics.UNAUTHENTICATED.inc()
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSAL)


# (request streaming, response streaming) -> handler of that kind; the kind decides how gRPC reads the call.
_HANDLER_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


class TokenAuth(grpc.aio.ServerInterceptor):
    """Refuses calls without an accepted bearer token, UNAUTHENTICATED, with a message that never repeats
    what was sent. The refusing handler has the kind of the real one and no deserializer: a refused
    request is never decoded. An unknown method stays UNIMPLEMENTED (the .proto is public)."""

    def __init__(self, tokens: TokenFile):
        self.tokens = tokens

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_METHODS):
            return handler
        if self.tokens.accepts(bearer_token(details.invocation_metadata)):
            return handler
        return _HANDLER_KINDS[handler.request_streaming, handler.response_streaming](_refuse)
