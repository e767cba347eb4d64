"""Dynamic batching per graph (Triton's vocabulary: max batch size, max queue delay, bounded queue).

Requests queue on the event loop; one task per graph closes a batch when it holds `max_batch_size`
rows or when its oldest request has waited `max_queue_delay` (one monotonic deadline per batch,
counted from that request's arrival), runs it in an executor thread so ONNX Runtime never blocks
the event loop, and splits the outputs back to the callers in order. While a batch computes the
next one fills, so batches grow with load even at zero delay.

Every request gets exactly one answer: its rows, the batch's error (a failing batch fails only its
own callers), RequestExpired when its deadline passed in the queue, or nothing when its caller
cancelled (it is dropped before compute). A full queue answers QueueFull at once.
"""

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from vaeserve.errors import ModelNotReady, QueueFull, VaeserveError
from vaeserve.service import metrics

log = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]


class RequestExpired(VaeserveError):
    """A request's deadline passed before its batch ran; mapped to DEADLINE_EXCEEDED."""


@dataclass(eq=False)
class _Request:
    feeds: Feeds
    rows: int
    future: asyncio.Future
    enqueued: float  # loop.time(), monotonic
    deadline: float | None  # loop.time() after which the caller no longer waits


@dataclass
class BatcherConfig:
    max_batch_size: int  # rows per run
    max_queue_delay: float  # seconds
    max_queue_size: int  # requests


class DynamicBatcher:
    def __init__(
        self, run: Callable[[Feeds], Feeds], config: BatcherConfig, executor: Executor, *, model: str, graph: str
    ):
        self._run_graph = run
        self.config = config
        self._executor = executor
        self.model, self.graph = model, graph
        self._queue: deque[_Request] = deque()
        self._queued_rows = 0
        self._wakeup = asyncio.Event()
        self._draining = False
        self._task: asyncio.Task | None = None
        self._pending = metrics.PENDING.labels(model, graph)
        self._queue_wait = metrics.QUEUE_WAIT.labels(model, graph)
        self._compute = metrics.COMPUTE.labels(model, graph)
        self._batch_rows = metrics.BATCH_ROWS.labels(model, graph)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._serve(), name=f"batcher {self.model}/{self.graph}")

    async def submit(self, feeds: Feeds, deadline: float | None = None) -> Feeds:
        """Queue rows for the graph and wait for their outputs. `deadline` is on the loop's clock."""
        if self._task is None or self._task.done():
            raise ModelNotReady(f"model {self.model!r} is not serving ({self.graph} batcher stopped)")
        if len(self._queue) >= self.config.max_queue_size:
            raise QueueFull(
                f"model {self.model!r} {self.graph} queue is full ({self.config.max_queue_size} requests); retry later"
            )
        loop = asyncio.get_running_loop()
        rows = next(iter(feeds.values())).shape[0]
        request = _Request(feeds, rows, loop.create_future(), loop.time(), deadline)
        self._queue.append(request)
        self._queued_rows += rows
        self._pending.inc()
        self._wakeup.set()
        try:
            return await request.future
        finally:
            self._pending.dec()

    def drain(self) -> None:
        """Stop waiting for batches to fill: run what is queued as soon as possible."""
        self._draining = True
        self._wakeup.set()

    async def close(self) -> None:
        """Stop the batcher; anything still queued is answered ModelNotReady."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        while self._queue:
            request = self._queue.popleft()
            if not request.future.done():
                request.future.set_exception(ModelNotReady(f"model {self.model!r} stopped serving"))
        self._queued_rows = 0

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            close_at = self._queue[0].enqueued + self.config.max_queue_delay
            while self._queued_rows < self.config.max_batch_size and not self._draining:
                remaining = close_at - loop.time()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    async with asyncio.timeout(remaining):
                        await self._wakeup.wait()
                except TimeoutError:
                    break
            batch = self._take(loop.time())
            if batch:
                await self._run(batch)

    def _take(self, now: float) -> list[_Request]:
        """The next batch: queued requests in order up to max_batch_size rows (at least one request),
        leaving out those cancelled or past their deadline."""
        batch, rows = [], 0
        while self._queue:
            request = self._queue[0]
            if batch and rows + request.rows > self.config.max_batch_size:
                break
            self._queue.popleft()
            self._queued_rows -= request.rows
            if request.future.done():  # cancelled by its caller
                continue
            if request.deadline is not None and now >= request.deadline:
                request.future.set_exception(RequestExpired(f"deadline passed after {now - request.enqueued:.3f} s in the queue"))
                continue
            self._queue_wait.observe(now - request.enqueued)
            batch.append(request)
            rows += request.rows
        return batch

    async def _run(self, batch: list[_Request]) -> None:
        if len(batch) == 1:
            feeds = batch[0].feeds
        else:
            feeds = {name: np.concatenate([r.feeds[name] for r in batch]) for name in batch[0].feeds}
        rows = sum(r.rows for r in batch)
        try:
            start = time.perf_counter()
            outputs = await asyncio.get_running_loop().run_in_executor(self._executor, self._run_graph, feeds)
            self._compute.observe(time.perf_counter() - start)
            self._batch_rows.observe(rows)
        except asyncio.CancelledError:
            _fail(batch, ModelNotReady(f"model {self.model!r} stopped serving"))
            raise
        except Exception as err:  # the graph failed: only this batch's callers hear of it
            log.exception("%s %s batch of %d rows failed", self.model, self.graph, rows)
            _fail(batch, err)
            return
        _answer(batch, lambda start, stop: {name: value[start:stop] for name, value in outputs.items()})


def _fail(batch: list[_Request], err: BaseException) -> None:
    for r in batch:
        if not r.future.done():
            r.future.set_exception(err)


def _answer(batch: list[_Request], rows_of: Callable[[int, int], object]) -> None:
    """Give each request of a batch its own rows of the batch's result, in order."""
    start = 0
    for r in batch:
        if not r.future.done():
            r.future.set_result(rows_of(start, start + r.rows))
        start += r.rows


class Coalescer:
    """Runs requests that arrive in the same event-loop tick as one call of an async batch function.

    Score does NumPy work per call (noise, likelihood, KL), about 100 us on a small model; with many
    concurrent single-row callers that, not the graphs, bounds throughput. Requests with the same key
    (options that must match within a call) are concatenated along rows, computed once, and each caller
    gets its own rows back. It waits no longer than the current tick, so a lone request is not delayed.
    Results are per row (the scoring noise is shared by all rows), so coalescing does not change them.
    """

    def __init__(self, compute: Callable, split: Callable, max_rows: int):
        self._compute = compute  # async (feeds, key, deadline) -> result
        self._split = split  # (result, start, stop) -> that slice of the result
        self._max_rows = max_rows  # rows per call, so coalescing never builds an unbounded batch
        self._pending: dict[tuple, list[_Request]] = {}
        self._tasks: set[asyncio.Task] = set()

    async def submit(self, key: tuple, feeds: Feeds, deadline: float | None):
        loop = asyncio.get_running_loop()
        request = _Request(feeds, feeds["x"].shape[0], loop.create_future(), loop.time(), deadline)
        group = self._pending.get(key)
        if group and sum(r.rows for r in group) + request.rows > self._max_rows:
            self._start(key, self._pending.pop(key))
            group = None
        if group is None:
            group = self._pending[key] = []
            loop.call_soon(lambda: key in self._pending and self._pending[key] is group and self._start(key, self._pending.pop(key)))
        group.append(request)
        return await request.future

    def _start(self, key: tuple, group: list[_Request]) -> None:
        task = asyncio.get_running_loop().create_task(self._run(key, group))
        self._tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._tasks.discard)

    async def _run(self, key: tuple, group: list[_Request]) -> None:
        now = asyncio.get_running_loop().time()
        batch = []
        for request in group:
            if request.future.done():  # cancelled by its caller
                continue
            if request.deadline is not None and now >= request.deadline:
                request.future.set_exception(RequestExpired("deadline passed before the request was computed"))
                continue
            batch.append(request)
        if not batch:
            return
        names = batch[0].feeds.keys()
        feeds = {n: np.concatenate([r.feeds[n] for r in batch]) if len(batch) > 1 else batch[0].feeds[n] for n in names}
        deadlines = [r.deadline for r in batch]
        deadline = None if None in deadlines else max(deadlines)
        try:
            result = await self._compute(feeds, key, deadline)
        except Exception as err:  # only this call's requests hear of it
            _fail(batch, err)
            return
        _answer(batch, lambda start, stop: self._split(result, start, stop))
