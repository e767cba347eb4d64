"""Python client, sync (`Client`) and asyncio (`AsyncClient`), NumPy in and out.

    with Client("localhost:50051") as client:
        result = client.score("digits", rows)           # rows: [N, features] raw floats, or one row [features]
        result.anomaly_score, result.p_value, result.is_anomaly
        client.score("digits", rows, alpha=0.01)        # flag at a 1% false-positive rate: p_value <= 0.01

    Client("vae.example.com:50051", ca="ca.pem", cert="client.pem", key="client.key", token=token)

`tls=True` turns TLS on with the system's CA roots, `ca` (the server's CA bundle) with that bundle;
`cert` and `key` present a client certificate (mTLS);
`token` goes as `authorization: Bearer <token>` metadata on every call, over TLS or plaintext alike.

Any number of rows goes in one call: a call the server would refuse as too large (more than its
`max_rows`, or more work than its `max_request_values`, as GetModel's `limits` say) is split into
requests of consecutive rows, `in_flight` (4) of them at a time, and the answers are joined in row order;
`progress(done_rows, total_rows)`, when given, is called after each. A model's limits are read once and
kept for a minute (`get_model` reads them afresh); a call of at most 64 rows that asks for no samples is
sent as it is without asking. The requests of a split call all go to one version (the newest when
`version` is 0, read when the call starts); with a `seed`, request k draws with seed + k. A request of a
split call answered Overloaded (the server full for the moment, e.g. other big calls beside it) is sent
again up to 4 times, after about 50 to 400 ms; a single request is the caller's to retry.

A call that fails raises a `ServerError` for its status code: `InvalidInput`, `NotFound`, `Overloaded`
(RESOURCE_EXHAUSTED: back off and retry), `DeadlineExceeded`, `Unavailable`, `Unauthenticated`, `Internal`,
or ServerError itself for any other code; `err.code()` is the grpc.StatusCode and str(err) the server's
message. It is also a grpc.RpcError (and a grpc.aio.AioRpcError), so handlers written for grpc's errors
still catch it; the error gRPC raised is its __cause__.

`score_stream` scores a feed on one stream (ScoreStream): each item of `rows` is one message, a 1-D row
or a 2-D array of rows, and it yields one answer per item, in order, as the server sends them: a
ScoreResult, or a StreamError for an item the server refused (the stream goes on). Only a failure of the
stream itself raises (Unavailable when the server drains: reconnect elsewhere and send what was not
answered). A stream has no deadline unless `timeout` is given, since a feed need not end:

    with Client("localhost:50051") as client:
        for answer in client.score_stream("digits", feed):   # feed: rows as they come
            ...

    async for answer in async_client.score_stream("digits", feed):   # feed: iterable or async iterable
        ...
"""

import asyncio
import collections
import dataclasses
import json
import random
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import numpy as np

from vaeserve.errors import ConfigError
from vaeserve.v1 import vaeserve_pb2 as pb
from vaeserve.v1 import vaeserve_pb2_grpc as pb_grpc

DEFAULT_TARGET = "localhost:50051"
IN_FLIGHT = 4  # requests of one split call in flight at once
PLANNED_ROWS = 64  # a call with more rows than this (or asking for samples) is sized against the model's limits
LIMITS_SECONDS = 60.0  # how long a model's limits, read with GetModel, are used before they are read again
_OPTIONS = [("grpc.max_receive_message_length", 256 * 1024 * 1024), ("grpc.max_send_message_length", 256 * 1024 * 1024)]
_FLOAT32 = np.dtype("<f4")
_SEEDS = 2**64  # seeds are uint64 on the wire

Progress = Callable[[int, int], None]  # (rows answered so far, rows in the call)


# Errors.


# A split call's part answered Overloaded (the server full for the moment) is sent again, after a backoff
# of about 50, 100, 200 and 400 ms; then its Overloaded is the call's.
OVERLOAD_RETRIES = 4
OVERLOAD_BACKOFF = 0.05


def _backoff(attempt: int) -> float:
    return OVERLOAD_BACKOFF * 2**attempt * random.uniform(0.75, 1.25)  # jittered: parts do not come back in step


class ServerError(grpc.aio.AioRpcError):
    """A call that ended with a status other than OK, from the server or from gRPC on the way (no
    connection, a message over a size limit). `code()` is its grpc.StatusCode, `details()` and str(err)
    the server's message. A grpc.RpcError and a grpc.aio.AioRpcError, so code written for grpc's errors
    keeps working; the error gRPC raised is its __cause__."""

    def __init__(self, code: grpc.StatusCode, message: str = ""):
        super().__init__(code, details=message)

    def __str__(self) -> str:
        return self.details() or ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code().name}: {self.details()!r})"

    def __reduce__(self):
        return type(self), (self.code(), self.details())


class InvalidInput(ServerError):
    """INVALID_ARGUMENT: the request itself is wrong (shape, NaN/Inf, unknown label, an option over its cap);
    the message names what. Sending it again will not help."""


class NotFound(ServerError):
    """NOT_FOUND: the server serves no such model or version."""


class Overloaded(ServerError):
    """RESOURCE_EXHAUSTED: the server is full (too many calls, a full queue, a deadline its queue cannot
    meet) and refused the call before computing it; back off and retry, or try another replica. gRPC also
    answers so for a message over the server's size limit."""


class DeadlineExceeded(ServerError):
    """DEADLINE_EXCEEDED: the call's deadline (the client's `timeout`) passed before it was answered."""


class Unavailable(ServerError):
    """UNAVAILABLE: no connection, the server still loading its models, or draining (retry elsewhere)."""


class Unauthenticated(ServerError):
    """UNAUTHENTICATED: the server wants a bearer token (`token=`) and got none, or an unknown one."""


class Internal(ServerError):
    """INTERNAL: a fault in the server; the message is fixed and the details are in the server's log."""


_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInput,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.INTERNAL: Internal,
}
_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}


def server_error(err: grpc.RpcError) -> ServerError:
    """The ServerError for an error gRPC raised (a grpc.Call: it has code() and details())."""
    code, message = err.code(), err.details() or ""
    return _ERRORS.get(code, ServerError)(code, message)


# Credentials and tensors.


def _read(path, what: str) -> bytes | None:
    try:
        return None if path is None else Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(f"{what} {path}: {err.strerror}") from None


def channel_credentials(ca=None, cert=None, key=None, tls: bool = False) -> grpc.ChannelCredentials | None:
    """TLS credentials when `tls` or any of the PEM files is given (without `ca`, the system's CA roots),
    else None: plaintext."""
    if not tls and ca is None and cert is None and key is None:
        return None
    if (cert is None) != (key is None):
        raise ConfigError("a client certificate needs both cert and key")
    return grpc.ssl_channel_credentials(_read(ca, "CA bundle"), _read(key, "client key"), _read(cert, "client certificate"))


def _call_metadata(token: str | None) -> tuple | None:
    return None if not token else (("authorization", f"Bearer {token}"),)


def to_tensor(array) -> pb.Tensor:
    """A Tensor message of `array` as little-endian float32, its shape as it is."""
    array = np.ascontiguousarray(array, _FLOAT32)
    return pb.Tensor(shape=array.shape, data=array.tobytes())


def to_array(tensor: pb.Tensor) -> np.ndarray | None:
    """The float32 array of a Tensor message (read-only, sharing its bytes); None for an empty one."""
    if not tensor.shape:
        return None
    return np.frombuffer(tensor.data, _FLOAT32).reshape(tuple(tensor.shape))


def _as_rows(x) -> np.ndarray:
    """Rows as float32 [N, width]: one row given as a 1-D array is one row."""
    return np.ascontiguousarray(np.atleast_2d(x), _FLOAT32)


def _labels(labels, rows: int) -> list[str]:
    """One label name per row: a single string is every row's label."""
    if labels is None:
        return []
    if isinstance(labels, str):
        return [labels] * rows
    return [str(label) for label in labels]


def _seed(seed: int | None, index: int) -> int | None:
    """Request `index` of a split call draws with seed + index, so its requests differ and repeat."""
    return None if seed is None else (seed + index) % _SEEDS


# Results.


@dataclass
class Embedding:
    """Embed's answer: the posterior q(z|x) of each row."""

    mu: np.ndarray  # [N, latent]
    logvar: np.ndarray  # [N, latent]
    samples: np.ndarray | None  # [S, N, latent] with posterior_samples S > 0
    version: int = 0  # the version that answered


@dataclass
class Reconstruction:
    """Reconstruct's answer: the decoder mean at z = mu, raw units, and per-row errors."""

    x: np.ndarray  # [N, features]
    neg_log_likelihood: np.ndarray  # [N] -log p(x | z = mu), nats
    mean_squared_error: np.ndarray  # [N] raw units
    version: int = 0


@dataclass
class ScoreResult:
    """Score's answer, per row (nats in the model's normalised space)."""

    neg_elbo: np.ndarray
    reconstruction: np.ndarray
    kl: np.ndarray
    is_anomaly: np.ndarray  # anomaly_score > threshold
    threshold: float  # the threshold applied, on anomaly_score
    per_feature: np.ndarray | None  # [N, features], with per_feature=True
    neg_iw: np.ndarray | None  # with iw_samples K > 0
    out_of_support: np.ndarray  # bool per row: a value outside the model's support (its penalty is in the scores)
    support_distance: np.ndarray | None  # [N, features], with per_feature: how far each value lies outside
    anomaly_score: np.ndarray  # the version's anomaly score (ModelInfo.threshold_score): what is_anomaly compares
    p_value: np.ndarray | None  # conformal p-value of anomaly_score; None for a version without calibration
    knn_distance: np.ndarray | None  # squared distance to the nearest training row; None without neighbours
    version: int = 0


@dataclass
class StreamError:
    """The server's answer to one message of a stream it could not score: what a unary call would raise."""

    code: grpc.StatusCode
    message: str


@dataclass
class Samples:
    """Generate's answer: decoder means x (raw units) at the latent points z."""

    x: np.ndarray  # [N, features]
    z: np.ndarray  # [N, latent]
    version: int = 0


@dataclass(frozen=True)
class Limits:
    """What the server accepts in one request (its settings), from GetModel."""

    max_rows: int
    max_request_values: int  # values of work: see docs/api.md "Limits"
    max_iw_samples: int
    max_posterior_samples: int


@dataclass(frozen=True)
class Calibration:
    """How the default threshold was set, from the manifest."""

    quantile: str | None  # the quantile of `score` the default threshold is ("0.99"), None if none of them
    target_false_positive_rate: float
    rows: int  # rows it was calibrated on, n
    calibrated_on: str  # which rows
    label_free: bool  # a CVAE's rows scored label-free
    # The rate the default threshold holds on rows like the calibration rows, k/(n+1) <= target, or 1/(n+1)
    # above it when n rows cannot reach the target; the target itself for a version without conformal calibration.
    promised_false_positive_rate: float
    smallest_false_positive_rate: float | None  # 1/(n+1), the smallest `alpha`; None without conformal calibration

    @property
    def target_reached(self) -> bool:
        """Whether the default threshold holds the target rate (False: too few calibration rows for it)."""
        return self.promised_false_positive_rate <= self.target_false_positive_rate * (1 + 1e-9)


@dataclass(frozen=True, eq=False)
class ModelInfo:
    """One model version as the server describes it (GetModel); `metadata` is the message itself and
    `manifest` its manifest.json, for anything not surfaced here."""

    name: str
    version: int
    kind: str  # vae | cvae | ppca
    arch: str
    latent_dim: int
    likelihood: str  # gaussian | gaussian-fixed | bernoulli
    normalization: str  # standardize | minmax | none
    features: int
    feature_names: tuple[str, ...]
    image_shape: tuple[int, ...] | None  # (channels, height, width) when rows are images
    labels: tuple[str, ...]  # a CVAE's label names, else empty
    label_column: str | None  # a CVAE's: the column its training data held the labels in, when recorded
    class_prior: tuple[float, ...]  # a CVAE's p(y), in label order
    threshold: float  # the default threshold on `threshold_score`
    threshold_score: str  # the score thresholds apply to, ScoreResult.anomaly_score: "combined" or "neg_elbo"
    quantiles: dict[str, dict[str, float]]  # score -> quantile ("0.99") -> value; both sorted
    calibration: Calibration | None
    elbo_samples: int  # posterior samples of each Score's ELBO
    iw_samples: int  # K the neg_iw quantiles were calibrated with
    seed: int  # of Score's posterior noise
    providers: dict[str, tuple[str, ...]]  # graph (encoder, decoder, score) -> execution providers granted
    limits: Limits | None  # None from a server too old to say
    support_low: np.ndarray = field(repr=False)  # [features] raw values the model answers for
    support_high: np.ndarray = field(repr=False)
    manifest: dict = field(repr=False)
    metadata: pb.ModelMetadata = field(repr=False)

    @property
    def conditional(self) -> bool:
        """Whether rows need labels (a CVAE)."""
        return self.kind == "cvae"


def _parse_model(m: pb.ModelMetadata) -> ModelInfo:
    manifest = json.loads(m.manifest_json) if m.manifest_json else {}
    t = m.thresholds
    quantiles = {score: dict(sorted(q.values.items(), key=lambda item: float(item[0])))
                 for score, q in sorted(t.quantiles.items())}  # fmt: skip
    calibration = None
    if "thresholds" in manifest:
        saved = manifest["thresholds"]
        quantile = next((q for q, value in quantiles.get(t.score, {}).items() if value == t.default), None)
        target = saved["target_false_positive_rate"]
        calibration = Calibration(quantile, target, saved["calibration_rows"], saved["calibrated_on"], saved["label_free"],
                                  saved.get("promised_false_positive_rate", target),
                                  saved.get("smallest_false_positive_rate"))  # fmt: skip
    graphs = {"encoder": m.encoder, "decoder": m.decoder} | ({"score": m.score} if m.HasField("score") else {})
    limits = m.limits if m.HasField("limits") else None
    return ModelInfo(
        name=m.name, version=m.version, kind=m.kind, arch=m.arch, latent_dim=m.latent_dim, likelihood=m.likelihood,
        normalization=m.normalization, features=m.features, feature_names=tuple(m.feature_names),
        image_shape=tuple(m.image_shape) or None, labels=tuple(m.labels),
        label_column=(manifest.get("labels") or {}).get("column"), class_prior=tuple(m.class_prior),
        threshold=t.default, threshold_score=t.score, quantiles=quantiles, calibration=calibration,
        elbo_samples=t.elbo_samples, iw_samples=t.iw_samples, seed=t.seed,
        providers={name: tuple(graph.providers) for name, graph in graphs.items()},
        limits=None if limits is None else Limits(limits.max_rows, limits.max_request_values, limits.max_iw_samples,
                                                  limits.max_posterior_samples),
        support_low=np.asarray(m.support.low, np.float32), support_high=np.asarray(m.support.high, np.float32),
        manifest=manifest, metadata=m,
    )  # fmt: skip


def _parse_embed(r: pb.EmbedResponse) -> Embedding:
    return Embedding(to_array(r.mu), to_array(r.logvar), to_array(r.samples), r.version)


def _parse_reconstruct(r: pb.ReconstructResponse) -> Reconstruction:
    return Reconstruction(to_array(r.x), np.asarray(r.neg_log_likelihood), np.asarray(r.mean_squared_error), r.version)


def _parse_score(r: pb.ScoreResponse) -> ScoreResult:
    def rows(values) -> np.ndarray | None:
        return np.asarray(values) if len(values) else None

    return ScoreResult(
        np.asarray(r.neg_elbo), np.asarray(r.reconstruction), np.asarray(r.kl), np.asarray(r.is_anomaly, bool),
        r.threshold, to_array(r.per_feature), rows(r.neg_iw), np.asarray(r.out_of_support, bool),
        to_array(r.support_distance),
        anomaly_score=np.asarray(r.anomaly_score if len(r.anomaly_score) else r.neg_elbo),  # an older server's score was neg_elbo
        p_value=rows(r.p_value), knn_distance=rows(r.knn_distance), version=r.version,
    )  # fmt: skip


def _parse_stream(r: pb.ScoreStreamResponse) -> ScoreResult | StreamError:
    if r.WhichOneof("result") == "error":
        return StreamError(_STATUS_CODES.get(r.error.code, grpc.StatusCode.UNKNOWN), r.error.message)
    return _parse_score(r.score)


def _parse_generate(r: pb.GenerateResponse) -> Samples:
    return Samples(to_array(r.x), to_array(r.z), r.version)


def _parse_models(r: pb.ListModelsResponse) -> dict[str, list[int]]:
    return {m.name: list(m.versions) for m in r.models}


def _joined(parts: list):
    """The answers of a split call's requests as one: arrays joined along the rows (samples: axis 1)."""
    first = parts[0]
    if len(parts) == 1:
        return first
    if isinstance(first, np.ndarray):
        return np.concatenate(parts)
    joined = {}
    for f in dataclasses.fields(first):
        value = getattr(first, f.name)
        if isinstance(value, np.ndarray):
            value = np.concatenate([getattr(part, f.name) for part in parts], axis=1 if f.name == "samples" else 0)
        joined[f.name] = value
    return type(first)(**joined)


def _score_request(model: str, x, labels, *, version: int, threshold: float | None, alpha: float | None,
                   per_feature: bool, iw_samples: int) -> pb.ScoreRequest:  # fmt: skip
    return pb.ScoreRequest(model=model, version=version, x=to_tensor(x), labels=labels or [], threshold=threshold,
                           alpha=alpha, per_feature=per_feature, iw_samples=iw_samples)  # fmt: skip


_ENDED = object()


def _stream_request(item, labels: Iterator | None, options: dict) -> pb.ScoreRequest:
    """The message for one item of a feed: a 1-D row (its label is the next of `labels`) or a 2-D array of
    rows (their labels, a list)."""
    x = np.asarray(item)
    label = None if labels is None else next(labels, _ENDED)
    if label is _ENDED:
        raise ValueError("labels ended before rows: give one labels item per rows item")
    if x.ndim == 1:
        x, label = x[None], None if label is None else [label]
    return _score_request(x=x, labels=_labels(label, len(x)), **options)


async def _each(items: Iterable | AsyncIterable) -> AsyncIterator:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item


@dataclass
class _Call:
    """One RPC over `rows` rows, which a client may send as several requests of consecutive rows."""

    method: str
    model: str
    version: int
    rows: int
    request: Callable[[slice, int, int], Any]  # (its rows, version, index of the request) -> the request message
    parse: Callable
    work: Callable[[ModelInfo], int]  # values of work per row, as the server counts them
    progress: Progress | None
    planned: bool  # size it against the model's limits, reading them first when they are not known
    splittable: bool = True  # False when its labels do not match its rows: one request, the server says why

    def rows_per_request(self, info: ModelInfo | None) -> int | None:
        """The most rows one request may carry within the limits; None when they are not known."""
        if info is None or info.limits is None or not info.limits.max_rows or not self.splittable:
            return None
        by_work = info.limits.max_request_values // max(1, self.work(info)) if info.limits.max_request_values else self.rows
        return max(1, min(info.limits.max_rows, by_work))

    def parts(self, size: int) -> list[slice]:
        return [slice(start, min(start + size, self.rows)) for start in range(0, self.rows, size)]

    def answered(self, part: slice) -> None:
        if self.progress is not None:
            self.progress(part.stop, self.rows)


def _score_work(iw_samples: int, labelled: bool) -> Callable[[ModelInfo], int]:
    """A Score row's work: (elbo_samples + K) posterior samples x features, x classes when a CVAE scores label-free."""
    return lambda m: (m.elbo_samples + iw_samples) * m.features * (len(m.labels) if m.conditional and not labelled else 1)


class _Requests:
    """The API, shared by both clients: each method builds a _Call, which the client runs (`_run`, sync or
    async) as one request or split within the model's limits."""

    def _run(self, call: _Call):
        raise NotImplementedError

    def _call(self, method: str, request, parse):
        raise NotImplementedError

    def _init_cache(self) -> None:
        self._infos: dict[tuple[str, int], tuple[float, ModelInfo]] = {}

    def _known(self, model: str, version: int, max_age: float = LIMITS_SECONDS) -> ModelInfo | None:
        """What GetModel said of (model, version) less than `max_age` seconds ago, or None."""
        seen = self._infos.get((model, version))
        return seen[1] if seen is not None and time.monotonic() - seen[0] < max_age else None

    def _remember(self, model: str, version: int, info: ModelInfo) -> ModelInfo:
        now = time.monotonic()
        self._infos[model, version] = self._infos[model, info.version] = (now, info)
        return info

    def embed(self, model: str, x, labels=None, *, version: int = 0, posterior_samples: int = 0,
              seed: int | None = None, progress: Progress | None = None):  # fmt: skip
        """The posterior q(z|x) of each row of `x` ([N, features] raw values, or one row): an Embedding with
        mu and logvar [N, latent], and with `posterior_samples` S > 0 samples [S, N, latent] (seeded by
        `seed`, random without). `labels`: a CVAE's label name per row (one string: every row's)."""
        x = _as_rows(x)
        labels = _labels(labels, len(x))

        def request(part, version, index):
            return pb.EmbedRequest(model=model, version=version, x=to_tensor(x[part]), labels=labels[part],
                                   posterior_samples=posterior_samples, seed=_seed(seed, index))  # fmt: skip

        work = lambda m: max(m.features, posterior_samples * m.latent_dim)  # noqa: E731
        return self._run(_Call("Embed", model, version, len(x), request, _parse_embed, work, progress,
                               len(x) > PLANNED_ROWS or posterior_samples > 0, _fits(labels, len(x))))  # fmt: skip

    def reconstruct(self, model: str, x, labels=None, *, version: int = 0, progress: Progress | None = None):
        """The decoder mean at z = mu for each row of `x` (raw units), with per-row neg_log_likelihood
        (nats) and mean_squared_error (raw units): a Reconstruction. `labels` as for embed."""
        x = _as_rows(x)
        labels = _labels(labels, len(x))

        def request(part, version, index):
            return pb.ReconstructRequest(model=model, version=version, x=to_tensor(x[part]), labels=labels[part])

        return self._run(_Call("Reconstruct", model, version, len(x), request, _parse_reconstruct,
                               lambda m: m.features, progress, len(x) > PLANNED_ROWS, _fits(labels, len(x))))  # fmt: skip

    def score(self, model: str, x, labels=None, *, version: int = 0, threshold: float | None = None,
              alpha: float | None = None, per_feature: bool = False, iw_samples: int = 0,
              progress: Progress | None = None):  # fmt: skip
        """Anomaly scores of each row of `x` ([N, features] raw values, or one row): a ScoreResult with the
        version's anomaly_score, its p_value (versions with conformal calibration), neg_elbo = reconstruction
        + kl, knn_distance (versions with neighbours), is_anomaly (anomaly_score above `threshold`, the
        manifest's calibrated default when None) and out_of_support. `alpha` in place of a threshold flags
        at that false-positive rate: the rows with p_value <= alpha. With `per_feature` the per-feature
        scores and support distances [N, features]; with `iw_samples` K > 0 the K-sample
        importance-weighted score neg_iw. A CVAE's rows without `labels` are scored label-free."""
        x = _as_rows(x)
        labels = _labels(labels, len(x))

        def request(part, version, index):
            return _score_request(model, x[part], labels[part], version=version, threshold=threshold, alpha=alpha,
                                  per_feature=per_feature, iw_samples=iw_samples)  # fmt: skip

        return self._run(_Call("Score", model, version, len(x), request, _parse_score, _score_work(iw_samples, bool(labels)),
                               progress, len(x) > PLANNED_ROWS or iw_samples > 0, _fits(labels, len(x))))  # fmt: skip

    def generate(self, model: str, count: int = 0, labels=None, *, version: int = 0,
                 temperature: float | None = None, seed: int | None = None, progress: Progress | None = None):  # fmt: skip
        """`count` samples of an unconditional model, or one per label of a CVAE's `labels`: decoder means
        x (raw units) at z ~ N(0, T^2 I), T = `temperature` (default 1), seeded by `seed`: a Samples."""
        labels = _labels(labels, max(count, 1))
        rows = len(labels) or count

        def request(part, version, index):
            if part == slice(0, rows):  # the whole call: the count as given, for the server to check
                return pb.GenerateRequest(model=model, version=version, count=count, labels=labels,
                                          temperature=temperature, seed=seed)  # fmt: skip
            return pb.GenerateRequest(model=model, version=version, count=0 if labels else part.stop - part.start,
                                      labels=labels[part], temperature=temperature, seed=_seed(seed, index))  # fmt: skip

        return self._run(_Call("Generate", model, version, rows, request, _parse_generate, lambda m: m.features,
                               progress, rows > PLANNED_ROWS, not labels or count in (0, len(labels))))  # fmt: skip

    def decode(self, model: str, z, labels=None, *, version: int = 0, progress: Progress | None = None):
        """The decoder mean (raw units) at each latent point of `z` ([N, latent], or one point), [N, features]."""
        z = _as_rows(z)
        labels = _labels(labels, len(z))

        def request(part, version, index):
            return pb.DecodeRequest(model=model, version=version, z=to_tensor(z[part]), labels=labels[part])

        return self._run(_Call("Decode", model, version, len(z), request, lambda r: to_array(r.x),
                               lambda m: m.features, progress, len(z) > PLANNED_ROWS, _fits(labels, len(z))))  # fmt: skip

    def models(self):
        """{model name: [versions, ascending]} of every model the server serves."""
        return self._call("ListModels", pb.ListModelsRequest(), _parse_models)

    def get_model(self, model: str, *, version: int = 0):
        """A ModelInfo of one model version (0: the newest served), read afresh from the server."""
        request = pb.GetModelRequest(model=model, version=version)
        return self._call("GetModel", request, lambda r: self._remember(model, version, _parse_model(r)))


def _fits(labels: list, rows: int) -> bool:
    return not labels or len(labels) == rows


def _single(call: _Call) -> Any:
    return call.request(slice(0, call.rows), call.version, 0)


class Client(_Requests):
    """A blocking client over one channel; thread-safe. `timeout` is each request's deadline in seconds
    (None: none), `in_flight` how many requests of a split call are sent at once. Use it as a context
    manager, or call close()."""

    def __init__(self, target: str = DEFAULT_TARGET, *, timeout: float | None = 30.0, ca=None, cert=None, key=None,
                 token: str | None = None, tls: bool = False, in_flight: int = IN_FLIGHT):  # fmt: skip
        self.timeout = timeout
        self.in_flight = max(1, in_flight)
        credentials = channel_credentials(ca, cert, key, tls)
        self._metadata = _call_metadata(token)
        self._channel = (grpc.insecure_channel(target, options=_OPTIONS) if credentials is None
                         else grpc.secure_channel(target, credentials, options=_OPTIONS))  # fmt: skip
        self._stub = pb_grpc.InferenceStub(self._channel)
        self._init_cache()
        self._reading = threading.Lock()  # one GetModel at a time: concurrent callers wait for its answer

    def _call(self, method, request, parse):
        try:
            response = getattr(self._stub, method)(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise server_error(err) from err
        return parse(response)

    def _info(self, model: str, version: int, max_age: float = LIMITS_SECONDS) -> ModelInfo:
        with self._reading:
            return self._known(model, version, max_age) or self.get_model(model, version=version)

    def _run(self, call: _Call):
        info = self._known(call.model, call.version)
        if info is None and call.planned and call.rows > 1:
            info = self._info(call.model, call.version)
        size = call.rows_per_request(info)
        if size is None or call.rows <= size:
            result = self._call(call.method, _single(call), call.parse)
            call.answered(slice(0, call.rows))
            return result
        if call.version == 0:  # every request to the version that is newest now
            info = self._info(call.model, 0, max_age=1.0)
            size = call.rows_per_request(info)
        return self._split(call, info.version, size)

    def _split(self, call: _Call, version: int, size: int):
        stub = getattr(self._stub, call.method).future
        answers, pending = [], collections.deque()

        def send(part, index):
            return stub(call.request(part, version, index), timeout=self.timeout, metadata=self._metadata)

        def collect():
            part, index, future = pending.popleft()
            for attempt in range(OVERLOAD_RETRIES + 1):
                try:
                    answers.append(call.parse(future.result()))
                    break
                except grpc.RpcError as err:
                    if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or attempt == OVERLOAD_RETRIES:
                        raise server_error(err) from err
                    time.sleep(_backoff(attempt))
                    future = send(part, index)
            call.answered(part)

        try:
            for index, part in enumerate(call.parts(size)):
                if len(pending) >= self.in_flight:
                    collect()
                pending.append((part, index, send(part, index)))
            while pending:
                collect()
        finally:
            for _, _, future in pending:  # a request failed: the others are not needed
                future.cancel()
        return _joined(answers)

    def score_stream(self, model: str, rows: Iterable, labels: Iterable | None = None, *, version: int = 0,
                     threshold: float | None = None, alpha: float | None = None, per_feature: bool = False,
                     iw_samples: int = 0, timeout: float | None = None) -> Iterator[ScoreResult | StreamError]:  # fmt: skip
        """Score each item of `rows` (a 1-D row, or a 2-D array of rows; `labels` parallel to it: a label,
        or a list) on one stream: per item, in order, its ScoreResult or StreamError. `timeout` is the
        whole stream's deadline (none by default: a feed need not end). A failure of the stream itself
        raises its ServerError."""
        options = dict(model=model, version=version, threshold=threshold, alpha=alpha, per_feature=per_feature,
                       iw_samples=iw_samples)  # fmt: skip
        failed = []  # gRPC reads the requests in a thread of its own and only cancels the call when that fails

        def requests():
            each_label = None if labels is None else iter(labels)
            try:
                for item in rows:
                    yield _stream_request(item, each_label, options)
            except Exception as err:
                failed.append(err)
                raise

        call = self._stub.ScoreStream(requests(), timeout=timeout, metadata=self._metadata)
        try:
            for response in call:
                yield _parse_stream(response)
        except grpc.RpcError as err:
            if failed:
                raise failed[0] from None
            raise server_error(err) from err
        finally:
            call.cancel()  # the caller stopped early: the server drops what it still holds

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncClient(_Requests):
    """The asyncio client: Client's methods as coroutines (score_stream an async iterator), for one event
    loop. Use it as an async context manager, or await close()."""

    def __init__(self, target: str = DEFAULT_TARGET, *, timeout: float | None = 30.0, ca=None, cert=None, key=None,
                 token: str | None = None, tls: bool = False, in_flight: int = IN_FLIGHT):  # fmt: skip
        self.timeout = timeout
        self.in_flight = max(1, in_flight)
        credentials = channel_credentials(ca, cert, key, tls)
        self._metadata = _call_metadata(token)
        self._channel = (grpc.aio.insecure_channel(target, options=_OPTIONS) if credentials is None
                         else grpc.aio.secure_channel(target, credentials, options=_OPTIONS))  # fmt: skip
        self._stub = pb_grpc.InferenceStub(self._channel)
        self._init_cache()
        self._reading: dict[tuple[str, int], asyncio.Future] = {}  # GetModel in flight: callers share its answer

    async def _call(self, method, request, parse):
        try:
            response = await getattr(self._stub, method)(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise server_error(err) from err
        return parse(response)

    async def _info(self, model: str, version: int, max_age: float = LIMITS_SECONDS) -> ModelInfo:
        key = (model, version)
        reading = self._reading.get(key)
        if reading is None:
            known = self._known(model, version, max_age)
            if known is not None:
                return known
            reading = self._reading[key] = asyncio.ensure_future(self.get_model(model, version=version))
            reading.add_done_callback(lambda _: self._reading.pop(key, None))
        return await asyncio.shield(reading)  # a caller cancelled does not cancel the others' answer

    async def _run(self, call: _Call):
        info = self._known(call.model, call.version)
        if info is None and call.planned and call.rows > 1:
            info = await self._info(call.model, call.version)
        size = call.rows_per_request(info)
        if size is None or call.rows <= size:
            result = await self._call(call.method, _single(call), call.parse)
            call.answered(slice(0, call.rows))
            return result
        if call.version == 0:  # every request to the version that is newest now
            info = await self._info(call.model, 0, max_age=1.0)
            size = call.rows_per_request(info)
        return await self._split(call, info.version, size)

    async def _split(self, call: _Call, version: int, size: int):
        stub = getattr(self._stub, call.method)
        answers, pending = [], collections.deque()

        def send(part, index):
            return stub(call.request(part, version, index), timeout=self.timeout, metadata=self._metadata)

        async def collect():
            part, index, sent = pending.popleft()
            for attempt in range(OVERLOAD_RETRIES + 1):
                try:
                    answers.append(call.parse(await sent))
                    break
                except grpc.RpcError as err:
                    if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or attempt == OVERLOAD_RETRIES:
                        raise server_error(err) from err
                    await asyncio.sleep(_backoff(attempt))
                    sent = send(part, index)
            call.answered(part)

        try:
            for index, part in enumerate(call.parts(size)):
                if len(pending) >= self.in_flight:
                    await collect()
                pending.append((part, index, send(part, index)))
            while pending:
                await collect()
        finally:
            for _, _, sent in pending:  # a request failed, or the caller was cancelled: the others are not needed
                sent.cancel()
        return _joined(answers)

    async def score_stream(self, model: str, rows: Iterable | AsyncIterable, labels: Iterable | None = None, *,
                           version: int = 0, threshold: float | None = None, alpha: float | None = None,
                           per_feature: bool = False, iw_samples: int = 0,
                           timeout: float | None = None) -> AsyncIterator[ScoreResult | StreamError]:  # fmt: skip
        """Client.score_stream, with `rows` an iterable or an async iterable."""
        options = dict(model=model, version=version, threshold=threshold, alpha=alpha, per_feature=per_feature,
                       iw_samples=iw_samples)  # fmt: skip
        failed = []  # gRPC reads the requests in a task of its own and only cancels the call when that fails

        async def requests():
            each_label = None if labels is None else iter(labels)
            try:
                async for item in _each(rows):
                    yield _stream_request(item, each_label, options)
            except Exception as err:
                failed.append(err)
                raise

        call = self._stub.ScoreStream(requests(), timeout=timeout, metadata=self._metadata)
        try:
            async for response in call:
                yield _parse_stream(response)
        except (grpc.RpcError, asyncio.CancelledError) as err:  # grpc.aio cancels the call locally: CancelledError here
            if failed and not asyncio.current_task().cancelling():
                raise failed[0] from None
            if isinstance(err, grpc.RpcError):
                raise server_error(err) from err
            raise
        finally:
            call.cancel()  # the caller stopped early: the server drops what it still holds

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        await self._channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
