"""Dynamic batching (Triton's vocabulary: max batch size, max queue delay, bounded queue).

A batcher owns one unit of work: a graph (Embed, Reconstruct, Generate, Decode), or the whole Score
pipeline of a model (encoder, posterior samples, decoder, likelihood), which runs as one call so a
batch of Score requests costs one computation instead of one per graph.

Requests queue on the event loop; a batch closes when it holds `max_batch_size` rows or when its
oldest request has waited `max_queue_delay` (one monotonic deadline per batch, counted from that
request's arrival). It closes sooner once it holds as many requests as recent batches did (the last
batch's count, or one less than the target before it, whichever is larger) and QUIET_TURNS turns of the
loop have passed without a new arrival: callers that call back to back come back together, and waiting
longer would only delay the ones already queued. So a lone caller pays no queue delay, N callers in a loop
get batches of N at once, and under a steady stream of arrivals batches wait out the delay and grow.
After a batcher has been idle for longer than the delay the target is back to one. (A caller left
calling back to back after a burst of N waits out the delay on up to N-1 requests while the target
comes down; remembering recent sizes is worth 4% of throughput at 64 callers.) Requests carry a key
(options that must agree within a batch, such as Score's K); a batch holds consecutive requests of
one key.

Where a batch runs depends on its size. A small one (at most INLINE_WORK rows of work) runs on the
event loop: handing it to a thread and back costs more than computing it, and its NumPy work holds
the GIL either way. A larger one runs in an executor thread, where ONNX Runtime releases the GIL, so
the loop keeps serving; one such batch computes at a time per batcher while the next one fills, so
batches grow with load. (Two full batches at once, each on a thread, gave 1.29x the rows/s of 256-row
Score at 8 callers, but under open-loop overload the two threads' GIL-holding NumPy work starved the event
loop: OK fell from 0.58-0.61x capacity to 0.13-0.19x, and refusals came after about 1 s instead of 14 ms.
The other way, every batch on the loop, gave 1.25x closed loop and 0.11-0.13x capacity under that
overload: a loop that computes falls behind the arrivals, which then wait in gRPC's queue unseen by
admission.)
Results are split back to the callers in order.

Every request gets exactly one answer: its rows, the batch's error (a failing batch fails only its
own callers), RequestExpired when its deadline passed in the queue, or nothing when its caller
cancelled (it is dropped before compute). A full queue (max_queue_size requests, or, for a request
larger than inline_work, max_queued_work values of work) answers QueueFull at once, except to requests
that arrive while a batch is about to start: they join it instead of waiting. So does a queue that
would not reach a request in time: the batches ahead of it (the queue cut into batches, and the one
computing) at the recent compute time per batch take more than half the time its deadline leaves.
Under overload the queue so stays as long as callers are willing to wait, and what it holds is
computed in time, instead of every request waiting until it expires. A batch holds at most max_work
values of work unless one request alone holds
more.
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
from vaeserve.service import memory, metrics

log = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]


class RequestExpired(VaeserveError):
    """A request's deadline passed before its batch ran; mapped to DEADLINE_EXCEEDED."""


@dataclass(eq=False)
class _Request:
    feeds: Feeds
    key: Hashable
    rows: int
    work: int  # values of work, as the batcher's `work` counts them
    future: asyncio.Future
    enqueued: float  # loop.time(), monotonic
    deadline: float | None  # loop.time() after which the caller no longer waits


@dataclass
class BatcherConfig:
    max_batch_size: int  # rows per run
    max_queue_delay: float  # seconds
    max_queue_size: int  # requests
    max_work: int | None = None  # values of work a batch may hold (one request alone may hold more); None: no cap
    max_queued_work: int | None = None  # values of work the queue may hold (one request alone may); None: no cap


# Values of work (rows x features of a graph; Score counts each posterior sample and class) up to which
# a batch runs on the event loop. Scoring 32 rows of the default digits model (256 decoder rows of 64
# features) takes about 0.26 ms on one core; a round trip through a thread costs about as much CPU on a
# small VM.
INLINE_WORK = 256 * 64
# Turns of the event loop without a new arrival after which a batch holding as many requests as recent ones
# starts. A request takes a few turns from gRPC's completion queue to submit(), so one quiet turn closed
# batches on requests already on their way: single-row Score of the digits model at 64 callers made batches
# of 2.8-3.3 rows at one turn and 7-8.7 at eight (1.5-1.8x the requests per second, fresh servers, 3 rounds);
# a lone caller (recent batches of one request) waits one turn, as before.
QUIET_TURNS = 8
# A request is queued only if the batches ahead of it, at the recent time per batch, fit in this share of
# the time its deadline leaves: the rest absorbs the estimate's error and the answer's way back.
QUEUE_SHARE_OF_DEADLINE = 0.5
SMOOTHING = 0.2  # weight of the latest batch in the moving average of compute time per batch


def slice_rows(outputs: Feeds, start: int, stop: int) -> Feeds:
    return {name: value[start:stop] for name, value in outputs.items()}


class DynamicBatcher:
    """`run(feeds, key)` computes a batch; `split(result, start, stop)` gives a caller its rows of the
    result; `work(rows, key)` says how much a batch costs, in values of work: up to `inline_work` it runs
    on the loop, and a batch holds at most `config.max_work`. `graph` names the batcher in metrics: encoder, decoder or score.

    Driven by callbacks on the event loop rather than a task of its own: one timer starts the batch
    at the queue's head when it is due, and the end of a batch in the executor schedules the next.
    That keeps the loop's work per batch to one timer, plus one executor submit and one thread-safe
    callback for a batch that leaves the loop.
    """

    def __init__(self, run: Callable[[Feeds, Hashable], object], config: BatcherConfig, executor: Executor, *,
                 model: str, graph: str, split: Callable[[object, int, int], object] = slice_rows,
                 work: Callable[[int, Hashable], int] = lambda rows, key: rows,
                 inline_work: int = INLINE_WORK):  # fmt: skip
        self._run_batch = run
        self._split = split
        self._work, self._inline_work = work, inline_work
        self.config = config
        self._executor = executor
        self.model, self.graph = model, graph
        self._queue: deque[_Request] = deque()
        self._queued_rows = self._queued_work = 0
        self._loop: asyncio.AbstractEventLoop | None = None  # set while serving
        self._timer: asyncio.Handle | None = None  # starts the batch of the request at the queue's head
        self._timer_due = 0.0  # loop.time() it is set for (uvloop's handle of a due call has no when())
        self._computing: asyncio.Future | None = None  # done when the batch in the executor has been answered
        self._draining = False
        self._expected = 1  # requests recent batches held, forgetting one per batch: as many are likely to come again
        self._arrived = False  # a request arrived since the timer was set
        self._quiet = 0  # turns of the loop the batch at the head has waited without an arrival
        self._idle_since = 0.0  # loop.time() when the queue last ran empty with nothing computing
        self._batch_seconds = 0.0  # compute time of recent batches (moving average)
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
        now = self._loop.time()
        if len(self._queue) >= self.config.max_queue_size and not self._starting(now):
            raise QueueFull(
                f"model {self.model!r} {self.graph} queue is full ({self.config.max_queue_size} requests); retry later"
            )
        rows = next(iter(feeds.values())).shape[0]
        work = self._work(rows, key)
        cap = self.config.max_queued_work
        # The cap holds back large requests only: small ones (max_queue_size bounds them) must not starve
        # behind a client that keeps the queue full of the largest requests.
        if (cap is not None and work > self._inline_work and self._queue and self._queued_work + work > cap
                and not self._starting(now)):  # fmt: skip
            raise QueueFull(f"model {self.model!r} {self.graph} queue holds {self._queued_work:,} values of work, "
                            f"{work:,} more would pass its {cap:,}; retry later")  # fmt: skip
        if deadline is not None and self._queue:
            ahead = self._batches_ahead(rows, work) * self._batch_seconds
            if ahead > QUEUE_SHARE_OF_DEADLINE * (deadline - now):
                raise QueueFull(f"model {self.model!r} {self.graph} queue holds about {ahead:.3f} s of batches, more "
                                f"than this call's deadline allows ({max(deadline - now, 0.0):.3f} s left); retry later")  # fmt: skip
        if not self._queue and self._computing is None and now - self._idle_since > self.config.max_queue_delay:
            self._expected = 1  # idle for longer than a batch would wait: the callers of past batches have gone
        request = _Request(feeds, key, rows, work, self._loop.create_future(), now, deadline)
        self._queue.append(request)
        self._queued_rows += rows
        self._queued_work += work
        self._pending.inc()
        self._arrived = True
        self._schedule()
        try:
            return await request.future
        except asyncio.CancelledError:
            if request in self._queue:  # still waiting: leave no room taken for a caller that has gone
                self._queue.remove(request)
                self._queued_rows -= rows
                self._queued_work -= work
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
        self._queued_rows = self._queued_work = 0

    def _starting(self, now: float) -> bool:
        """A batch starts on this turn of the loop: requests arriving meanwhile join it rather than
        waiting in the queue."""
        return self._computing is None and self._timer is not None and self._timer_due <= now

    def _batches_ahead(self, rows: int, work: int) -> int:
        """Batches to run before a new request's is done: the one computing, and the queue with it in
        batches of max_batch_size rows and max_work values of work (a lower bound: keys split batches too)."""
        batches = -(-(self._queued_rows + rows) // self.config.max_batch_size)
        if self.config.max_work:
            batches = max(batches, -(-(self._queued_work + work) // self.config.max_work))
        return batches + (self._computing is not None)

    def _delay_ends(self) -> float:
        return self._queue[0].enqueued + self.config.max_queue_delay

    def _urgent(self) -> bool:
        return self._queued_rows >= self.config.max_batch_size or self._draining

    def _schedule(self) -> None:
        """Make sure the timer will start the next batch when it is due: on the loop's next turn when it
        is full, draining or holds as many requests as recent batches, else when its oldest request has
        waited max_queue_delay."""
        if self._computing is not None or self._loop is None:
            return
        if not self._queue:
            self._idle_since = self._loop.time()
            return
        due = self._loop.time() if self._urgent() or len(self._queue) >= self._expected else self._delay_ends()
        if self._timer is not None:
            if self._timer_due <= due:
                return  # an arrival meanwhile leaves _arrived set: the batch waits for quiet turns again
            self._timer.cancel()
        self._arrived, self._quiet = False, 0
        self._timer, self._timer_due = self._loop.call_at(due, self._start_batch), due

    def _start_batch(self) -> None:
        """Take the next batch and compute it: here when it is small, else in the executor. Before its
        delay is up, a batch that is not full waits until QUIET_TURNS turns have passed without an arrival
        (one turn for a lone request when recent batches held one)."""
        self._timer = None
        if self._loop is None:
            return
        loop = self._loop
        now = loop.time()
        self._quiet = 0 if self._arrived else self._quiet + 1
        # A lone request after lone batches (one caller) waits one quiet turn; concurrent callers QUIET_TURNS.
        quiet = QUIET_TURNS if self._expected > 1 or len(self._queue) > 1 else 1
        if self._quiet < quiet and self._queue and not self._urgent() and now < self._delay_ends():
            self._arrived = False  # requests may still be on their way: give them another turn to join
            self._timer, self._timer_due = loop.call_at(now, self._start_batch), now
            return
        batch = self._take(now)
        if not batch:  # all cancelled or expired: the queue is empty
            return self._schedule()
        self._expected = max(len(batch), self._expected - 1)
        rows, key = sum(r.rows for r in batch), batch[0].key
        start = time.perf_counter()
        try:
            if len(batch) == 1:
                feeds = batch[0].feeds
            else:
                feeds = {name: np.concatenate([r.feeds[name] for r in batch]) for name in batch[0].feeds}
            if self._work(rows, key) <= self._inline_work:
                result = self._run_batch(feeds, key)
            else:
                job = self._executor.submit(self._run_batch, feeds, key)
                self._computing = loop.create_future()
                job.add_done_callback(lambda job: loop.call_soon_threadsafe(self._finish_job, batch, rows, start, job))
                return
        except Exception as err:  # feeds that do not stack, a failing run, or the executor shut down
            self._answer(batch, rows, start, None, err)
        else:
            self._answer(batch, rows, start, result, None)
        self._schedule()

    def _finish_job(self, batch: list[_Request], rows: int, start: float, job: Future) -> None:
        """Back on the loop after a batch in the executor: answer it, then schedule the next."""
        try:
            result, err = job.result(), None
        except Exception as failure:
            result, err = None, failure
        self._answer(batch, rows, start, result, err)
        self._computing.set_result(None)
        self._computing = None
        memory.large_batch_done(self._loop or asyncio.get_running_loop())
        self._schedule()

    def _answer(self, batch: list[_Request], rows: int, start: float, result, err: Exception | None) -> None:
        """Give each caller its rows of the result, or the batch's error."""
        if err is None:
            try:
                elapsed = time.perf_counter() - start
                self._compute.observe(elapsed)
                self._batch_seconds += SMOOTHING * (elapsed - self._batch_seconds) if self._batch_seconds else elapsed
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

    def _take(self, now: float) -> list[_Request]:
        """The next batch: queued requests of one key in order, up to max_batch_size rows and max_work
        values of work (at least one request), leaving out those cancelled or past their deadline."""
        batch, rows, cap = [], 0, self.config.max_work
        while self._queue:
            request = self._queue[0]
            if batch and (rows + request.rows > self.config.max_batch_size or request.key != batch[0].key
                          or cap is not None and self._work(rows + request.rows, request.key) > cap):  # fmt: skip
                break
            self._queue.popleft()
            self._queued_rows -= request.rows
            self._queued_work -= request.work
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
