"""The one place domain errors become gRPC status codes, and where every RPC is counted and timed.

Bad input never yields INTERNAL; anything unexpected does, with a fixed message so internals do not
leak (the traceback goes to the server log).
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

    @functools.wraps(method)
    async def handler(self, request, context):
        memory.rpc_started()
        start = time.perf_counter()
        model = getattr(request, "model", "")
        if model not in self.model_names:
            model = ""
        code = grpc.StatusCode.OK
        try:
            return await method(self, request, context)
        except VaeserveError as err:
            code = status_of(err)
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
