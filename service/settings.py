"""Server settings, typed and loaded in one place: defaults here, then `VAESERVE_*` environment
variables, then command-line flags. A plain dataclass rather than pydantic-settings: a dozen scalar
fields do not justify another dependency in the service image, and every field still has one
documented default, one type, one environment variable and a range check.
"""

import math
import os
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path

from vaeserve.errors import ConfigError

ENV_PREFIX = "VAESERVE_"


def _setting(default, doc: str, minimum=None):
    return field(default=default, metadata={"doc": doc, "minimum": minimum})


@dataclass(frozen=True)
class Settings:
    repository: Path | None = _setting(None, "model repository: <name>/<version>/{encoder,decoder}.onnx + manifest.json")
    host: str = _setting("127.0.0.1", "address the gRPC server binds; [::] or 0.0.0.0 for every interface (the image does)")
    port: int = _setting(50051, "gRPC port; 0 picks a free one (single worker only)", 0)
    health_port: int = _setting(
        -1, "a second, plaintext port on host serving grpc.health.v1 only, for probes that cannot speak TLS "
        "(Kubernetes' gRPC probes); -1 = none, 0 picks a free one", -1,
    )
    metrics_host: str = _setting("127.0.0.1", "address the Prometheus /metrics HTTP server binds (plaintext, no auth)")
    metrics_port: int = _setting(8000, "Prometheus /metrics HTTP port; 0 picks a free one, -1 disables", -1)
    tls_cert: Path | None = _setting(None, "PEM certificate chain of the server; with tls_key, the port speaks TLS only")
    tls_key: Path | None = _setting(None, "PEM private key of tls_cert")
    tls_client_ca: Path | None = _setting(None, "PEM CA bundle: clients must present a certificate it signed (mTLS)")
    auth_tokens_file: Path | None = _setting(
        None, "file of accepted bearer tokens (one per line, or sha256:<hex>); every RPC but health needs one"
    )
    reflection: bool = _setting(True, "serve gRPC reflection (behind the tokens when auth_tokens_file is set)")
    repository_poll_seconds: float = _setting(
        10.0, "how often the repository is rescanned for new, changed and removed versions; 0 = only on SIGHUP", 0.0
    )
    max_versions: int = _setting(0, "versions served per model, the newest that load; 0 = all", 0)
    workers: int = _setting(1, "server processes sharing the port through SO_REUSEPORT", 1)
    max_batch_size: int = _setting(256, "rows per graph run; a larger request runs alone, never split", 1)
    # 5 ms, not 2: under a steady stream of arrivals (a busy event loop) a batch waits out the delay, so the
    # delay sets the batch size. Single-row Score of the digits model at 64 callers, fresh servers, 3 x 2 rounds:
    # batches of 5-7 rows and a median 2,270 req/s at 2 ms, 16-20 rows and 2,640 at 5 ms (2,570 at 10 ms); at
    # 8 callers and at 1 nothing changes (those batches start on their quiet turns, not on the delay).
    max_queue_delay_ms: float = _setting(
        5.0, "longest a request waits for others to join its batch; a batch as large as recent ones starts at once", 0.0
    )
    max_queue_size: int = _setting(1024, "requests queued per batcher before RESOURCE_EXHAUSTED", 1)
    max_rows: int = _setting(4096, "rows one request may carry", 1)
    max_iw_samples: int = _setting(1024, "largest K a Score request may ask for", 0)
    max_posterior_samples: int = _setting(256, "largest number of posterior samples an Embed may ask for", 0)
    max_request_values: int = _setting(
        1 << 25,
        "work one request may ask for, in values: rows x posterior samples x label-free classes x features "
        "(Score), rows x posterior samples x latent dimensions (Embed), rows x features (the others); "
        "refused with INVALID_ARGUMENT above it, and no batch holds more unless one request does",
        1,
    )
    intra_op_threads: int = _setting(1, "ONNX Runtime intra-op threads per session (non-spinning)", 1)
    compute_threads: int = _setting(0, "threads running large batches off the event loop; 0 = one per CPU core", 0)
    drain_notice_seconds: float = _setting(
        5.0, "on SIGTERM/SIGINT, how long health says NOT_SERVING while calls are still served, for balancers to "
        "notice; a second signal skips it", 0.0,
    )
    drain_seconds: float = _setting(
        10.0, "after the notice, how long calls already accepted may take to finish; new ones get UNAVAILABLE", 0.0
    )
    max_concurrent_rpcs: int = _setting(
        0, "calls inside handlers at once; more get RESOURCE_EXHAUSTED at once (gRPC itself refuses beyond twice "
        "this, counting calls not yet handled and health); 0 = max_batch_size + 128: a batch of single-row calls "
        "and room for others; the fewer calls held, the less memory and queueing an overload costs", 0,
    )
    max_streams: int = _setting(
        0, "streams (ScoreStream, ModelStreamInfer) open at once; more are refused RESOURCE_EXHAUSTED at open. Each "
        "holds one of gRPC's concurrent calls while open, idle or not; 0 = a third of gRPC's limit (2 x "
        "max_concurrent_rpcs), 256 with the defaults", 0,
    )
    stream_window: int = _setting(
        64, "messages of one stream (ScoreStream, ModelStreamInfer) in flight at once; the stream's next message "
        "is read when one is answered", 1,
    )
    warmup_rows: int = _setting(8, "rows of zeros run through every graph before reporting SERVING", 0)

    @classmethod
    def env_name(cls, name: str) -> str:
        return ENV_PREFIX + name.upper()

    @classmethod
    def load(cls, environ=None, **overrides) -> "Settings":
        """Defaults, then the environment, then `overrides` (flags; None means not given)."""
        environ = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            raw = environ.get(cls.env_name(f.name))
            if raw is not None and raw != "":
                values[f.name] = _parse(f, raw, cls.env_name(f.name))
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        for f in fields(self):
            value, minimum = getattr(self, f.name), f.metadata["minimum"]
            if minimum is not None and value < minimum:
                raise ConfigError(f"{f.name} ({self.env_name(f.name)}) must be >= {minimum}, got {value}")
        if self.repository is None:
            raise ConfigError(f"no model repository: pass --repository DIR or set {self.env_name('repository')}")
        if not Path(self.repository).is_dir():
            raise ConfigError(f"model repository {self.repository} is not a directory")
        if self.workers > 1 and self.port == 0:
            raise ConfigError("--workers > 1 needs a fixed --port for the workers to share")
        for f in fields(self):
            if f.type is float and not math.isfinite(getattr(self, f.name)):
                raise ConfigError(f"{f.name} ({self.env_name(f.name)}) must be a finite number, got {getattr(self, f.name)}")
        if self.health_port > 0 and self.health_port == self.port:
            raise ConfigError(f"health_port {self.health_port} is the gRPC port; give it a port of its own")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("TLS needs both tls_cert and tls_key (VAESERVE_TLS_CERT, VAESERVE_TLS_KEY)")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError("tls_client_ca (mTLS) needs tls_cert and tls_key too")
        for name in ("tls_cert", "tls_key", "tls_client_ca", "auth_tokens_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{name} ({self.env_name(name)}): {path} is not a file")

    @property
    def concurrent_rpcs(self) -> int:
        return self.max_concurrent_rpcs or self.max_batch_size + 128

    @property
    def streams(self) -> int:
        return self.max_streams or max(1, 2 * self.concurrent_rpcs // 3)

    def with_(self, **changes) -> "Settings":
        return replace(self, **changes)


BOOLEANS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def parse_bool(raw: str) -> bool:
    try:
        return BOOLEANS[raw.strip().lower()]
    except KeyError:
        raise ValueError(f"{raw!r} is not one of {', '.join(BOOLEANS)}") from None


def value_type(f):
    """The parser of a field's values: Path for paths, parse_bool for booleans, else the type itself."""
    kind = f.type
    if kind in (Path | None, Path):
        return Path
    return parse_bool if kind is bool else kind


def _parse(f, raw: str, env: str):
    try:
        return value_type(f)(raw)
    except ValueError:
        raise ConfigError(f"{env}={raw!r} is not a valid {f.type.__name__ if isinstance(f.type, type) else f.type}") from None


def describe() -> list[tuple[str, str, object, str, object]]:
    """(field, environment variable, default, doc, value parser) for --help and docs."""
    return [
        (f.name, Settings.env_name(f.name), None if f.default is MISSING else f.default, f.metadata["doc"], value_type(f))
        for f in fields(Settings)
    ]
