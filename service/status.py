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
from collections.abc import Awaitable, Callable
from typing import NamedTuple

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
_refusing: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None


def limit_in_flight(calls: int) -> None:
    global _max_in_flight
    _max_in_flight = calls


def stop_accepting() -> None:
    """From now on every call is answered UNAVAILABLE (the drain); calls already inside finish, and open
    streams end once they have answered the messages they hold."""
    global _accepting, _last_refused
    _accepting = False
    _last_refused = time.monotonic()  # the quiet the drain waits for is counted from here
    if _refusing is not None:
        _refusing[1].set()


def refusing() -> asyncio.Event:
    """Set once the server stops accepting (an event of the running loop)."""
    global _refusing
    loop = asyncio.get_running_loop()
    if _refusing is None or _refusing[0] is not loop:
        _refusing = (loop, asyncio.Event())
        if not _accepting:
            _refusing[1].set()
    return _refusing[1]


def seconds_since_refused() -> float:
    """How long no call has come in since the server stopped accepting."""
    return time.monotonic() - _last_refused


def deadline(context) -> float | None:
    """The call's deadline on the event loop's clock, or None."""
    remaining = context.time_remaining()
    return None if remaining is None else asyncio.get_running_loop().time() + remaining


def status_of(err: VaeserveError) -> grpc.StatusCode:
    for kind, code in STATUS.items():
        if isinstance(err, kind):
            return code
    return grpc.StatusCode.INVALID_ARGUMENT  # another user-actionable error: e.g. a bad option


def refuse_draining() -> ModelNotReady:
    """Count a call refused because the server is draining (the drain waits for such calls to stop
    coming); the error to answer it with."""
    global _last_refused
    _last_refused = time.monotonic()
    metrics.REJECTED.labels("draining").inc()
    return ModelNotReady(DRAINING_MESSAGE)


def _admit(remaining: float | None) -> None:
    """Refuse a call the server does not take now: draining, too many in flight, its deadline passed."""
    if not _accepting:
        raise refuse_draining()
    if memory.in_flight() > _max_in_flight:
        raise QueueFull(f"the server holds {_max_in_flight} calls, its max_concurrent_rpcs; retry later")
    if remaining is not None and remaining <= 0:
        raise RequestExpired("the deadline passed before the call was handled")


def accepting() -> bool:
    return _accepting


class Outcome(NamedTuple):
    code: grpc.StatusCode
    message: str  # the error's, "" when OK
    value: object  # the reply, when OK


class Calls:
    """Admission, error mapping, counting and timing for the calls of one method: unary RPCs, or the
    messages of a stream, each counted as a call of its own.

    The `model` label is the model the caller named when the server serves it, else "" so that unknown
    names sent by callers cannot grow the label set; `version` is the version that answered ("" when none did).
    """

    def __init__(self, method: str):
        self.method = method
        # Label children looked up once per label set (a handful: served models, "", status codes).
        self._requests = functools.cache(lambda model, version, code: metrics.REQUESTS.labels(method, model, version, code))
        self._latency = functools.cache(lambda model, version: metrics.REQUEST_LATENCY.labels(method, model, version))
        self._rejected = functools.cache(lambda reason: metrics.REJECTED.labels(reason))

    async def run(self, model: str, call: Callable[[], Awaitable], remaining: float | None, admit: bool = True) -> Outcome:
        """Admit (unless not `admit`) and await call(); a domain error becomes its status code and message,
        anything else INTERNAL with a fixed message (the traceback goes to the log). Cancellation propagates."""
        memory.rpc_started()
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        served = metrics.SERVED_VERSION.set("")
        try:
            if admit:
                _admit(remaining)
            return Outcome(code, "", await call())
        except VaeserveError as err:
            code = status_of(err)
            reason = REJECTED_REASONS.get(type(err))
            if reason is not None:
                self._rejected(reason).inc()
            return Outcome(code, str(err), None)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            log.exception("%s failed", self.method)
            code = grpc.StatusCode.INTERNAL
            return Outcome(code, INTERNAL_MESSAGE, None)
        finally:
            version = metrics.SERVED_VERSION.get() if model else ""
            metrics.SERVED_VERSION.reset(served)
            self._requests(model, version, code.name).inc()
            self._latency(model, version).observe(time.perf_counter() - start)
            memory.rpc_finished(asyncio.get_running_loop())


def rpc(method, admit: bool = True):
    """Wrap a unary servicer method with Calls: an error is the call's status. The servicer's
    `model_label(request)` names the model for the metrics."""
    calls = Calls(method.__name__)

    @functools.wraps(method)
    async def handler(self, request, context):
        outcome = await calls.run(self.model_label(request), lambda: method(self, request, context), context.time_remaining(),
                                  admit)  # fmt: skip
        if outcome.code != grpc.StatusCode.OK:
            await context.abort(outcome.code, outcome.message)
        return outcome.value

    return handler


def probe(method):
    """rpc for a probe (is the server live, ready): counted, never refused, neither for the load nor the
    drain (a liveness probe refused under load would restart a busy server), and no drain refusal."""
    return rpc(method, admit=False)
