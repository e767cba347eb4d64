"""Dynamic batching (Triton's vocabulary: max batch size, max queue delay, bounded queue).

A batcher owns one unit of work: a graph (Embed, Reconstruct, Generate, Decode), or the whole Score
pipeline of a model (encoder, posterior samples, decoder, likelihood), which runs as one call so a
batch of Score requests costs one trip off the event loop instead of one per graph.

Requests queue on the event loop; a batch closes when it holds `max_batch_size` rows or when its
oldest request has waited `max_queue_delay` (one monotonic deadline per batch, counted from that
request's arrival). The wait only happens while callers have company: when the last batch held a
single request, the next one starts at once, so a lone caller pays no queue delay. A batch runs
in an executor thread so ONNX Runtime and NumPy never block the event loop, and its result is split
back to the callers in order. One batch computes at a time per batcher; while it computes the next
one fills, so batches grow with load even at zero delay. Requests carry a key (options that must
agree within a batch, such as Score's K); a batch holds consecutive requests of one key.

Every request gets exactly one answer: its rows, the batch's error (a failing batch fails only its
own callers), RequestExpired when its deadline passed in the queue, or nothing when its caller
cancelled (it is dropped before compute). A full queue answers QueueFull at once.
"""

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Executor, Future
from dataclasses import dataclass

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
    key: Hashable
    rows: int
    future: asyncio.Future
    enqueued: float  # loop.time(), monotonic
    deadline: float | None  # loop.time() after which the caller no longer waits


@dataclass
class BatcherConfig:
    max_batch_size: int  # rows per run
    max_queue_delay: float  # seconds
    max_queue_size: int  # requests


def slice_rows(outputs: Feeds, start: int, stop: int) -> Feeds:
    return {name: value[start:stop] for name, value in outputs.items()}


class DynamicBatcher:
    """`run(feeds, key)` computes a batch in an executor thread; `split(result, start, stop)` gives a
    caller its rows of the result. `graph` names the batcher in metrics: encoder, decoder or score.

    Driven by callbacks on the event loop rather than a task of its own: a batch starts from `submit`
    (when it is due), from a timer set for when its oldest request has waited max_queue_delay, or when
    the previous batch ends.
    That keeps the loop's work per batch to one timer, one executor submit and one thread-safe
    callback, which matters when batches are a few rows and the loop also runs gRPC.
    """

    def __init__(self, run: Callable[[Feeds, Hashable], object], config: BatcherConfig, executor: Executor, *,
                 model: str, graph: str, split: Callable[[object, int, int], object] = slice_rows):  # fmt: skip
        self._run_batch = run
        self._split = split
        self.config = config
        self._executor = executor
        self.model, self.graph = model, graph
        self._queue: deque[_Request] = deque()
        self._queued_rows = 0
        self._loop: asyncio.AbstractEventLoop | None = None  # set while serving
        self._timer: asyncio.TimerHandle | None = None  # starts the batch of the request at the queue's head
        self._computing: asyncio.Future | None = None  # done when the batch in the executor has been answered
        self._draining = False
        self._company = False  # the last batch held more than one request: waiting for others pays
        self._pending = metrics.PENDING.labels(model, graph)
        self._queue_wait = metrics.QUEUE_WAIT.labels(model, graph)
        self._compute = metrics.COMPUTE.labels(model, graph)
        self._batch_rows = metrics.BATCH_ROWS.labels(model, graph)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    async def submit(self, feeds: Feeds, deadline: float | None = None, key: Hashable = None):
        """Queue rows and wait for their part of the result. `deadline` is on the loop's clock."""
        if self._loop is None:
            raise ModelNotReady(f"model {self.model!r} is not serving ({self.graph} batcher stopped)")
        if len(self._queue) >= self.config.max_queue_size:
            raise QueueFull(
                f"model {self.model!r} {self.graph} queue is full ({self.config.max_queue_size} requests); retry later"
            )
        rows = next(iter(feeds.values())).shape[0]
        request = _Request(feeds, key, rows, self._loop.create_future(), self._loop.time(), deadline)
        self._queue.append(request)
        self._queued_rows += rows
        self._pending.inc()
        self._schedule()
        try:
            return await request.future
        except asyncio.CancelledError:
            if request in self._queue:  # still waiting: leave no room taken for a caller that has gone
                self._queue.remove(request)
                self._queued_rows -= rows
            raise
        finally:
            self._pending.dec()

    def drain(self) -> None:
        """Stop waiting for batches to fill: run what is queued as soon as possible."""
        self._draining = True
        self._schedule()

    async def close(self) -> None:
        """Stop the batcher: the batch computing is answered, anything still queued gets ModelNotReady."""
        self._loop = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._computing is not None:
            await asyncio.shield(self._computing)
        while self._queue:
            request = self._queue.popleft()
            if not request.future.done():
                request.future.set_exception(ModelNotReady(f"model {self.model!r} stopped serving"))
        self._queued_rows = 0

    def _schedule(self) -> None:
        """Start the next batch if it is due; otherwise make sure a timer will start it."""
        if self._computing is not None or not self._queue or self._loop is None:
            return
        due = self._queue[0].enqueued + (self.config.max_queue_delay if self._company else 0.0)
        if self._queued_rows >= self.config.max_batch_size or self._draining or due <= self._loop.time():
            self._start_batch()
        elif self._timer is None:
            self._timer = self._loop.call_at(due, self._start_batch)

    def _start_batch(self) -> None:
        """Take the next batch and hand it to the executor; its end calls `_finish` on the loop."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._computing is not None or self._loop is None:
            return
        loop = self._loop
        batch = self._take(loop.time())
        if not batch:
            return self._schedule()
        self._company = len(batch) > 1
        self._computing = loop.create_future()
        start = time.perf_counter()
        try:
            if len(batch) == 1:
                feeds = batch[0].feeds
            else:
                feeds = {name: np.concatenate([r.feeds[name] for r in batch]) for name in batch[0].feeds}
            job = self._executor.submit(self._run_batch, feeds, batch[0].key)
        except Exception as err:  # feeds that do not stack, or the executor shut down
            return self._finish(batch, start, None, err)
        job.add_done_callback(lambda job: loop.call_soon_threadsafe(self._finish, batch, start, job, None))

    def _finish(self, batch: list[_Request], start: float, job: Future | None, err: Exception | None) -> None:
        """Give each caller its rows of the result, or the batch's error; then start the next batch."""
        rows = sum(r.rows for r in batch)
        try:
            if err is None:
                result = job.result()
                self._compute.observe(time.perf_counter() - start)
                self._batch_rows.observe(rows)
                offset = 0
                for r in batch:  # in order
                    if not r.future.done():
                        r.future.set_result(self._split(result, offset, offset + r.rows))
                    offset += r.rows
        except Exception as failure:
            err = failure
        if err is not None:  # only this batch's callers hear of it
            log.error("%s %s batch of %d rows failed", self.model, self.graph, rows, exc_info=err)
            _fail(batch, err)
        self._computing.set_result(None)
        self._computing = None
        self._schedule()

    def _take(self, now: float) -> list[_Request]:
        """The next batch: queued requests of one key in order, up to max_batch_size rows (at least one
        request), leaving out those cancelled or past their deadline."""
        batch, rows = [], 0
        while self._queue:
            request = self._queue[0]
            if batch and (rows + request.rows > self.config.max_batch_size or request.key != batch[0].key):
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


def _fail(batch: list[_Request], err: BaseException) -> None:
    for r in batch:
        if not r.future.done():
            r.future.set_exception(err)
