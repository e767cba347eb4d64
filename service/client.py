"""Python client, sync (`Client`) and asyncio (`AsyncClient`), NumPy in and out.

    with Client("localhost:50051") as client:
        result = client.score("digits", rows)           # rows: [N, features] float array
        result.neg_elbo, result.is_anomaly

    Client("vae.example.com:50051", ca="ca.pem", cert="client.pem", key="client.key", token=token)

`tls=True` turns TLS on with the system's CA roots, `ca` (the server's CA bundle) with that bundle;
`cert` and `key` present a client certificate (mTLS);
`token` goes as `authorization: Bearer <token>` metadata on every call, over TLS or plaintext alike.

Errors arrive as grpc.RpcError (sync) / grpc.aio.AioRpcError (asyncio) with the server's status code
and message.

`score_stream` scores a feed on one stream (ScoreStream): each item of `rows` is one message, a 1-D row
or a 2-D array of rows, and it yields one answer per item, in order, as the server sends them: a
ScoreResult, or a StreamError for an item the server refused (the stream goes on). Only a failure of the
stream itself raises (UNAVAILABLE when the server drains: reconnect elsewhere and send what was not
answered). A stream has no deadline unless `timeout` is given, since a feed need not end:

    with Client("localhost:50051") as client:
        for answer in client.score_stream("digits", feed):   # feed: rows as they come
            ...

    async for answer in async_client.score_stream("digits", feed):   # feed: iterable or async iterable
        ...
"""

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from vaeserve.errors import ConfigError
from vaeserve.v1 import vaeserve_pb2 as pb
from vaeserve.v1 import vaeserve_pb2_grpc as pb_grpc

DEFAULT_TARGET = "localhost:50051"
_OPTIONS = [("grpc.max_receive_message_length", 256 * 1024 * 1024), ("grpc.max_send_message_length", 256 * 1024 * 1024)]
_FLOAT32 = np.dtype("<f4")


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
    array = np.ascontiguousarray(array, _FLOAT32)
    return pb.Tensor(shape=array.shape, data=array.tobytes())


def to_array(tensor: pb.Tensor) -> np.ndarray | None:
    if not tensor.shape:
        return None
    return np.frombuffer(tensor.data, _FLOAT32).reshape(tuple(tensor.shape))


@dataclass
class Embedding:
    mu: np.ndarray
    logvar: np.ndarray
    samples: np.ndarray | None  # [S, N, latent]


@dataclass
class Reconstruction:
    x: np.ndarray
    neg_log_likelihood: np.ndarray
    mean_squared_error: np.ndarray


@dataclass
class ScoreResult:
    neg_elbo: np.ndarray
    reconstruction: np.ndarray
    kl: np.ndarray
    is_anomaly: np.ndarray
    threshold: float
    per_feature: np.ndarray | None
    neg_iw: np.ndarray | None
    out_of_support: np.ndarray  # bool per row: a value outside the model's support (always flagged)
    support_distance: np.ndarray | None  # [N, features], with per_feature: how far each value lies outside


@dataclass
class StreamError:
    """The server's answer to one message of a stream it could not score: what a unary call would raise."""

    code: grpc.StatusCode
    message: str


@dataclass
class Samples:
    x: np.ndarray
    z: np.ndarray


def _labels(labels) -> list[str]:
    return [] if labels is None else [str(label) for label in labels]


def _parse_embed(r: pb.EmbedResponse) -> Embedding:
    return Embedding(to_array(r.mu), to_array(r.logvar), to_array(r.samples))


def _parse_reconstruct(r: pb.ReconstructResponse) -> Reconstruction:
    return Reconstruction(to_array(r.x), np.asarray(r.neg_log_likelihood), np.asarray(r.mean_squared_error))


def _parse_score(r: pb.ScoreResponse) -> ScoreResult:
    return ScoreResult(
        np.asarray(r.neg_elbo), np.asarray(r.reconstruction), np.asarray(r.kl), np.asarray(r.is_anomaly, bool),
        r.threshold, to_array(r.per_feature), np.asarray(r.neg_iw) if len(r.neg_iw) else None,
        np.asarray(r.out_of_support, bool), to_array(r.support_distance),
    )  # fmt: skip


_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}


def _parse_stream(r: pb.ScoreStreamResponse) -> ScoreResult | StreamError:
    if r.WhichOneof("result") == "error":
        return StreamError(_STATUS_CODES.get(r.error.code, grpc.StatusCode.UNKNOWN), r.error.message)
    return _parse_score(r.score)


def _parse_generate(r: pb.GenerateResponse) -> Samples:
    return Samples(to_array(r.x), to_array(r.z))


def _parse_models(r: pb.ListModelsResponse) -> dict[str, list[int]]:
    return {m.name: list(m.versions) for m in r.models}


def _score_request(model: str, x, labels, *, version: int, threshold: float | None, per_feature: bool,
                   iw_samples: int) -> pb.ScoreRequest:  # fmt: skip
    return pb.ScoreRequest(model=model, version=version, x=to_tensor(x), labels=_labels(labels),
                           threshold=threshold, per_feature=per_feature, iw_samples=iw_samples)  # fmt: skip


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
    return _score_request(x=x, labels=label, **options)


async def _each(items: Iterable | AsyncIterable) -> AsyncIterator:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item


class _Requests:
    """Request building shared by both clients; `_call` is sync or async."""

    def _call(self, method: str, request, parse):
        raise NotImplementedError

    def embed(self, model: str, x, labels=None, *, version: int = 0, posterior_samples: int = 0, seed: int | None = None):
        request = pb.EmbedRequest(model=model, version=version, x=to_tensor(x), labels=_labels(labels),
                                  posterior_samples=posterior_samples, seed=seed)  # fmt: skip
        return self._call("Embed", request, _parse_embed)

    def reconstruct(self, model: str, x, labels=None, *, version: int = 0):
        request = pb.ReconstructRequest(model=model, version=version, x=to_tensor(x), labels=_labels(labels))
        return self._call("Reconstruct", request, _parse_reconstruct)

    def score(self, model: str, x, labels=None, *, version: int = 0, threshold: float | None = None,
              per_feature: bool = False, iw_samples: int = 0):  # fmt: skip
        request = _score_request(model, x, labels, version=version, threshold=threshold, per_feature=per_feature,
                                 iw_samples=iw_samples)  # fmt: skip
        return self._call("Score", request, _parse_score)

    def generate(self, model: str, count: int = 0, labels=None, *, version: int = 0,
                 temperature: float | None = None, seed: int | None = None):  # fmt: skip
        request = pb.GenerateRequest(model=model, version=version, count=count, labels=_labels(labels),
                                     temperature=temperature, seed=seed)  # fmt: skip
        return self._call("Generate", request, _parse_generate)

    def decode(self, model: str, z, labels=None, *, version: int = 0):
        request = pb.DecodeRequest(model=model, version=version, z=to_tensor(z), labels=_labels(labels))
        return self._call("Decode", request, lambda r: to_array(r.x))

    def models(self):
        """{model name: [versions, ascending]}."""
        return self._call("ListModels", pb.ListModelsRequest(), _parse_models)

    def get_model(self, model: str, *, version: int = 0):
        """The ModelMetadata message."""
        return self._call("GetModel", pb.GetModelRequest(model=model, version=version), lambda r: r)


class Client(_Requests):
    def __init__(self, target: str = DEFAULT_TARGET, *, timeout: float | None = 30.0, ca=None, cert=None, key=None,
                 token: str | None = None, tls: bool = False):  # fmt: skip
        self.timeout = timeout
        credentials = channel_credentials(ca, cert, key, tls)
        self._metadata = _call_metadata(token)
        self._channel = (grpc.insecure_channel(target, options=_OPTIONS) if credentials is None
                         else grpc.secure_channel(target, credentials, options=_OPTIONS))  # fmt: skip
        self._stub = pb_grpc.InferenceStub(self._channel)

    def _call(self, method, request, parse):
        return parse(getattr(self._stub, method)(request, timeout=self.timeout, metadata=self._metadata))

    def score_stream(self, model: str, rows: Iterable, labels: Iterable | None = None, *, version: int = 0,
                     threshold: float | None = None, per_feature: bool = False, iw_samples: int = 0,
                     timeout: float | None = None) -> Iterator[ScoreResult | StreamError]:  # fmt: skip
        """Score each item of `rows` (a 1-D row, or a 2-D array of rows; `labels` parallel to it: a label,
        or a list) on one stream: per item, in order, its ScoreResult or StreamError. `timeout` is the
        whole stream's deadline (none by default: a feed need not end)."""
        options = dict(model=model, version=version, threshold=threshold, per_feature=per_feature, iw_samples=iw_samples)
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
        except grpc.RpcError:
            if failed:
                raise failed[0] from None
            raise
        finally:
            call.cancel()  # the caller stopped early: the server drops what it still holds

    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncClient(_Requests):
    def __init__(self, target: str = DEFAULT_TARGET, *, timeout: float | None = 30.0, ca=None, cert=None, key=None,
                 token: str | None = None, tls: bool = False):  # fmt: skip
        self.timeout = timeout
        credentials = channel_credentials(ca, cert, key, tls)
        self._metadata = _call_metadata(token)
        self._channel = (grpc.aio.insecure_channel(target, options=_OPTIONS) if credentials is None
                         else grpc.aio.secure_channel(target, credentials, options=_OPTIONS))  # fmt: skip
        self._stub = pb_grpc.InferenceStub(self._channel)

    async def _call(self, method, request, parse):
        return parse(await getattr(self._stub, method)(request, timeout=self.timeout, metadata=self._metadata))

    async def score_stream(self, model: str, rows: Iterable | AsyncIterable, labels: Iterable | None = None, *,
                           version: int = 0, threshold: float | None = None, per_feature: bool = False,
                           iw_samples: int = 0,
                           timeout: float | None = None) -> AsyncIterator[ScoreResult | StreamError]:  # fmt: skip
        """Client.score_stream, with `rows` an iterable or an async iterable."""
        options = dict(model=model, version=version, threshold=threshold, per_feature=per_feature, iw_samples=iw_samples)
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
        except (grpc.RpcError, asyncio.CancelledError):  # grpc.aio cancels the call locally: CancelledError here
            if failed and not asyncio.current_task().cancelling():
                raise failed[0] from None
            raise
        finally:
            call.cancel()  # the caller stopped early: the server drops what it still holds

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
