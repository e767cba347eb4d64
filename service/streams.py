"""Streams of requests answered in order: each message is a call of its own (admitted, batched with
all other traffic, counted and timed by status.Calls), up to `window` of them in flight per stream.

The stream's reader takes the next message only when a slot is free, so a client that sends faster
than the server answers is held back by gRPC's flow control rather than by memory here. Answers go out
in the order the messages came. An error answers only its message. When the stream ends, is cancelled
or passes its deadline, the messages still queued are cancelled, which takes them out of their
batchers' queues. When the server stops accepting (the drain), the reader stops, the messages taken in
are answered, and the stream ends with UNAVAILABLE so the client moves to another replica.
"""

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc

from vaeserve.errors import InvalidInput
from vaeserve.service import metrics, status, wire

Request = TypeVar("Request")
Reply = TypeVar("Reply")


class Draining(Exception):
    """The server stopped accepting while the stream was open: end it with UNAVAILABLE."""


async def answer_in_order(requests: AsyncIterator[Request], answer: Callable[[Request], Awaitable[Reply]],
                          window: int) -> AsyncIterator[Reply]:  # fmt: skip
    """Yield answer(request) for each request in order, computing up to `window` at once. Raises Draining
    after the last answer when the server stopped accepting before the client finished sending."""
    slots = asyncio.Semaphore(window)
    answers: asyncio.Queue[asyncio.Task | None] = asyncio.Queue()
    refusing = status.refusing()
    drained = False

    async def read() -> None:
        try:
            it = aiter(requests)
            while True:
                await slots.acquire()
                try:
                    request = await anext(it)
                except StopAsyncIteration:
                    return
                if drained:  # came in after the drain began: the stream ends without it
                    return
                answers.put_nowait(asyncio.ensure_future(answer(request)))
        finally:
            answers.put_nowait(None)

    async def watch() -> None:  # the drain ends the stream after what it took in
        nonlocal drained
        await refusing.wait()
        if not reader.done():  # the client had not finished sending
            drained = True
            answers.put_nowait(None)

    reader = asyncio.ensure_future(read())
    watcher = asyncio.ensure_future(watch())
    try:
        while (task := await answers.get()) is not None:
            yield await task
            slots.release()
        if not drained:
            await reader  # a failure to read the stream is the stream's error
    finally:
        watcher.cancel()
        if drained:
            # A read cancelled while gRPC completes it can fail the call with INTERNAL: the pending read is
            # left to end with the call (the abort that follows), its outcome dropped.
            reader.add_done_callback(lambda task: task.cancelled() or task.exception())
        else:
            reader.cancel()
        while not answers.empty():
            task = answers.get_nowait()
            if task is not None:
                task.cancel()
    if drained:
        raise Draining(status.DRAINING_MESSAGE)


async def serve(requests: AsyncIterator, context, calls: status.Calls, label: Callable[[Request], str],
                handle: Callable[[Request], Awaitable], reply: Callable[[Request, status.Outcome], Reply],
                settings) -> AsyncIterator[Reply]:  # fmt: skip
    """A stream handler: each message is a call of `calls` (named label(message) in the metrics) whose
    value is handle(message), answered with reply(message, outcome), in order, settings.stream_window at
    once. A message whose bytes did not decode is INVALID_ARGUMENT, logged as unary ones are. Refused at
    open with UNAVAILABLE while the server drains, and with RESOURCE_EXHAUSTED beyond settings.streams
    open streams (each holds one of gRPC's concurrent RPCs for as long as it is open: idle feeds must not
    take them all); ended with UNAVAILABLE when the drain begins."""
    global _open
    if not status.accepting():
        await context.abort(grpc.StatusCode.UNAVAILABLE, str(status.refuse_draining()))
    if _open >= settings.streams:
        metrics.REJECTED.labels("overloaded").inc()
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"the server holds {_open} open streams, its max_streams; retry later")  # fmt: skip

    async def undecodable(message: wire.Undecodable):
        wire.note_undecodable(calls.method)
        raise InvalidInput(message.message)

    async def answer(message) -> Reply:
        if isinstance(message, wire.Undecodable):
            return reply(message, await calls.run("", lambda: undecodable(message), None))
        return reply(message, await calls.run(label(message), lambda: handle(message), context.time_remaining()))

    _open += 1
    metrics.OPEN_STREAMS.inc()
    try:
        async for response in answer_in_order(requests, answer, settings.stream_window):
            yield response
    except Draining:
        await context.abort(grpc.StatusCode.UNAVAILABLE, status.DRAINING_MESSAGE)
    finally:
        _open -= 1
        metrics.OPEN_STREAMS.dec()


_open = 0  # streams open in this process
