"""The one place domain errors become gRPC status codes, and where every RPC is counted and timed.

Bad input never yields INTERNAL; anything unexpected does, with a fixed message so internals do not
leak (the traceback goes to the server log).

It is also where a call is admitted: once the server stops accepting (the drain, after its notice),
new calls get UNAVAILABLE; beyond max_concurrent_rpcs calls inside handlers, RESOURCE_EXHAUSTED; a call
whose deadline passed before its handler ran, DEADLINE_EXCEEDED without being computed. All are
counted in vaeserve_rejected_total, as are the RESOURCE_EXHAUSTED answers of full queues.
"""

import asyncio
import functools
import logging
import time

import grpc

from vaeserve.errors import InvalidInput, ModelNotFound, ModelNotReady, QueueFull, VaeserveError
from vaeserve.service import memory, metrics
from vaeserve.service.batching import RequestExpired

log = logging.getLogger(__name__)

STATUS = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ModelNotReady: grpc.StatusCode.UNAVAILABLE,
    RequestExpired: grpc.StatusCode.DEADLINE_EXCEEDED,
}
INTERNAL_MESSAGE = "internal error; the server log has the details"
REJECTED_REASONS = {QueueFull: "overloaded", RequestExpired: "expired"}  # errors answered before any compute
for _reason in ("overloaded", "expired", "draining"):  # exported at 0 from the start, for rate() and dashboards
    metrics.REJECTED.labels(_reason)
DRAINING_MESSAGE = "the server is shutting down; retry on another replica"

_accepting = True
_last_refused = 0.0  # time.monotonic() of the last call answered UNAVAILABLE for the drain
_max_in_flight = 2**31  # calls inside handlers at once (settings.max_concurrent_rpcs)


def limit_in_flight(calls: int) -> None:
    global _max_in_flight
    _max_in_flight = calls


def stop_accepting() -> None:
    """From now on every call is answered UNAVAILABLE (the drain); calls already inside finish."""
    global _accepting, _last_refused
    _accepting = False
    _last_refused = time.monotonic()  # the quiet the drain waits for is counted from here


def seconds_since_refused() -> float:
    """How long no call has come in since the server stopped accepting."""
    return time.monotonic() - _last_refused


def status_of(err: VaeserveError) -> grpc.StatusCode:
    for kind, code in STATUS.items():
        if isinstance(err, kind):
            return code
    return grpc.StatusCode.INVALID_ARGUMENT  # another user-actionable error: e.g. a bad option


def rpc(method):
    """Wrap a servicer method: map errors to status codes, count and time the call.

    The `model` label is the request's model when the server serves it, else "" so that unknown
    names sent by callers cannot grow the label set.
    """
    name = method.__name__
    # Label children looked up once per label set (a handful: served models, "", status codes).
    requests = functools.cache(lambda model, code: metrics.REQUESTS.labels(name, model, code))
    latency = functools.cache(lambda model: metrics.REQUEST_LATENCY.labels(name, model))
    rejected = functools.cache(lambda reason: metrics.REJECTED.labels(reason))

    @functools.wraps(method)
    async def handler(self, request, context):
        memory.rpc_started()
        start = time.perf_counter()
        model = getattr(request, "model", "")
        if model not in self.model_names:
            model = ""
        code = grpc.StatusCode.OK
        try:
            if not _accepting:
                global _last_refused
                _last_refused = time.monotonic()
                rejected("draining").inc()
                raise ModelNotReady(DRAINING_MESSAGE)
            if memory.in_flight() > _max_in_flight:
                raise QueueFull(f"the server holds {_max_in_flight} calls, its max_concurrent_rpcs; retry later")
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                raise RequestExpired("the deadline passed before the call was handled")
            return await method(self, request, context)
        except VaeserveError as err:
            code = status_of(err)
            reason = REJECTED_REASONS.get(type(err))
            if reason is not None:
                rejected(reason).inc()
            await context.abort(code, str(err))
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except grpc.aio.AbortError:
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        except Exception:
            log.exception("%s failed", name)
            code = grpc.StatusCode.INTERNAL
            await context.abort(code, INTERNAL_MESSAGE)
        finally:
            requests(model, code.name).inc()
            latency(model).observe(time.perf_counter() - start)
            memory.rpc_finished(asyncio.get_running_loop())

    return handler
