"""Registering services so that bytes which do not decode get INVALID_ARGUMENT, not UNKNOWN.

grpc.aio answers a request whose protobuf cannot be parsed with UNKNOWN, a Python exception class in
the message and a traceback in the log, for every such request. `add_service` registers a generated
service with a deserializer that never raises: undecodable bytes become an `Undecodable` request, and
the method answers INVALID_ARGUMENT with a fixed message before the servicer sees it (in a stream, the
servicer answers that message alone with the error, and the stream goes on). They are counted
in vaeserve_requests_total (model "") and logged at most once a minute, with how many came since.
"""

import logging
import threading
import time

import grpc

from vaeserve.service import metrics

log = logging.getLogger(__name__)

LOG_EVERY = 60.0  # seconds between log lines about undecodable requests


class Undecodable:
    """Stands for a request whose bytes are not a valid message of its type."""

    __slots__ = ("message",)

    def __init__(self, message: str):
        self.message = message


class _Throttled:
    """One log line per LOG_EVERY seconds, saying how many events it covers."""

    def __init__(self):
        self._lock = threading.Lock()
        self._last, self._count = -LOG_EVERY, 0

    def note(self, method: str) -> None:
        with self._lock:
            self._count += 1
            now = time.monotonic()
            if now - self._last < LOG_EVERY:
                return
            count, self._count, self._last = self._count, 0, now
        log.warning("undecodable request to %s (%d since the last such line); answered INVALID_ARGUMENT", method, count)


_undecodable_log = _Throttled()


def note_undecodable(method: str) -> None:
    """Log (throttled) an undecodable message that a stream's servicer answers on its own."""
    _undecodable_log.note(method)


def _guard(full_method: str, handler: grpc.RpcMethodHandler, type_name: str) -> grpc.RpcMethodHandler:
    decode = handler.request_deserializer
    refusal = f"the request is not a valid {type_name} message"
    method = full_method.rsplit("/", 1)[-1]

    def lenient(data: bytes):
        try:
            return decode(data)
        except Exception:  # DecodeError, and anything else a corrupt payload provokes
            return Undecodable(refusal)

    if handler.request_streaming:  # the servicer answers an Undecodable message of a stream on its own
        return handler._replace(request_deserializer=lenient)

    def wrap(behavior):
        async def guarded(request, context):
            if isinstance(request, Undecodable):
                _undecodable_log.note(full_method)
                metrics.REQUESTS.labels(method, "", "", grpc.StatusCode.INVALID_ARGUMENT.name).inc()
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            return await behavior(request, context)

        return guarded

    if handler.response_streaming:
        return handler._replace(request_deserializer=lenient, unary_stream=wrap(handler.unary_stream))
    return handler._replace(request_deserializer=lenient, unary_unary=wrap(handler.unary_unary))


class _Recorder:
    """Takes the place of the server while generated code registers a service, to keep its handlers."""

    def __init__(self):
        self.services: list[tuple[str, dict]] = []

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass  # rebuilt from the registered handlers, which generated code passes as well

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.services.append((service, handlers))


def add_service(server: grpc.aio.Server, register, servicer, descriptor, served_as: str | None = None) -> None:
    """`register(servicer, server)` (a generated add_*Servicer_to_server) with every method guarded;
    `descriptor` (the service's protobuf ServiceDescriptor) names the request types. `name` serves it
    under another service name than its proto's (`served_as`: the path clients call is /<served_as>/<method>)."""
    recorder = _Recorder()
    register(servicer, recorder)
    if not recorder.services:
        raise RuntimeError(f"{register.__name__} registered no method handlers: the generated code is not what wire expects")
    for service, handlers in recorder.services:
        service = served_as or service
        guarded = {
            name: _guard(f"/{service}/{name}", handler, descriptor.methods_by_name[name].input_type.full_name)
            for name, handler in handlers.items()
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, guarded),))
        server.add_registered_method_handlers(service, guarded)
