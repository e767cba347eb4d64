"""DynamicBatcher on a real thread pool and a real event loop: batches form, every caller gets exactly
one answer (its own rows, its batch's error, RequestExpired, QueueFull or ModelNotReady), and a full
Score queue reaches a gRPC caller as RESOURCE_EXHAUSTED.

The run function computes y = 2x + key. Column 0 of every request's x holds the request's id, so the
run function records which requests each batch held, in order, and on which thread. Small batches run
on the event loop and larger ones in the executor; both ways are tested. To pin down what is queued
when, a test sends every batch to the executor, keeps the batcher busy with a head batch of
max_batch_size rows (which starts at once) held at a gate, and lets batches through one permit at a
time; those tests rely on no particular queue-delay policy. Two tests pin down the policy itself: when
a batch starts before its delay is up.
"""

import asyncio
import itertools
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from vaeserve.errors import ModelNotReady, QueueFull
from vaeserve.service.batching import INLINE_WORK, QUIET_TURNS, BatcherConfig, DynamicBatcher, RequestExpired

TIMEOUT = 5.0  # seconds; bounds every wait, so a broken batcher fails the test instead of hanging it
LONG_DELAY = 10.0  # a max_queue_delay no test waits out
_model_ids = itertools.count()


def affine(feeds, key):
    """What a batch computes: y = 2x + key (no key counts as 0)."""
    return {"y": feeds["x"] * 2 + (key or 0)}


class Recorder:
    """A run function: `affine`, recording every batch as (key, request id of each row). With a gate,
    each batch takes one permit before it computes; a batch holding the poison request raises."""

    def __init__(self, gate: threading.Semaphore | None = None, poison: int | None = None):
        self.gate, self.poison = gate, poison
        self.entered = threading.Semaphore(0)  # one permit per batch that reached the run function
        self.batches: list[tuple[object, list[int]]] = []
        self.threads: list[int] = []  # the thread each batch ran on

    def __call__(self, feeds, key):
        ids = feeds["x"][:, 0].astype(int).tolist()
        self.batches.append((key, ids))
        self.threads.append(threading.get_ident())
        self.entered.release()
        if self.gate is not None and not self.gate.acquire(timeout=TIMEOUT):
            raise TimeoutError("the test never let this batch through")
        if self.poison in ids:
            raise ValueError(f"request {self.poison} is poison")
        return affine(feeds, key)

    async def computing(self) -> None:
        """Wait until the next batch reaches the run function."""
        assert await asyncio.to_thread(self.entered.acquire, timeout=TIMEOUT), "no batch reached the run function"


def request(request_id: int, rows: int = 1) -> dict[str, np.ndarray]:
    x = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3)
    x[:, 0] = request_id
    return {"x": x}


@pytest.fixture
def executor():
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield pool


@pytest.fixture
def gate(executor):
    """A shut gate (no permits), flung open at teardown before the executor joins its threads."""
    permits = threading.Semaphore(0)
    yield permits
    permits.release(100)


def make_batcher(run, executor, *, max_batch_size: int, max_queue_delay: float, max_queue_size: int = 64,
                 inline_work: int = 0, max_work: int | None = None, max_queued_work: int | None = None):  # fmt: skip
    """A batcher whose batches all run in the executor, unless `inline_work` says otherwise. Its work is
    the rows (the default)."""
    config = BatcherConfig(max_batch_size, max_queue_delay, max_queue_size, max_work, max_queued_work)
    return DynamicBatcher(run, config, executor, model=f"batching-test-{next(_model_ids)}", graph="g",
                          inline_work=inline_work)  # fmt: skip


def pending(batcher: DynamicBatcher) -> float:
    labels = {"model": batcher.model, "graph": batcher.graph}
    return REGISTRY.get_sample_value("vaeserve_pending_requests", labels)


async def until_pending(batcher: DynamicBatcher, count: int) -> None:
    """Yield to the loop (no time passes) until `count` requests are queued or computing."""
    for _ in range(1000):
        if pending(batcher) == count:
            return
        await asyncio.sleep(0)
    pytest.fail(f"{count} requests never showed as pending (saw {pending(batcher)})")


def submit(batcher: DynamicBatcher, request_id: int, rows: int = 1, **options) -> asyncio.Future:
    return asyncio.ensure_future(batcher.submit(request(request_id, rows), **options))


def serve(scenario):
    return asyncio.run(asyncio.wait_for(scenario, 2 * TIMEOUT))


def assert_answered(result, request_id: int, rows: int = 1, key=None):
    np.testing.assert_array_equal(result["y"], affine(request(request_id, rows), key)["y"])


@pytest.mark.parametrize("inline_work", [0, INLINE_WORK], ids=["executor", "loop"])
def test_concurrent_requests_share_batches_and_each_gets_its_own_rows(executor, inline_work):
    run = Recorder()
    batcher = make_batcher(run, executor, max_batch_size=8, max_queue_delay=0.01, inline_work=inline_work)
    sizes = [1 + i % 4 for i in range(30)]
    big = 12
    sizes[big] = 20  # more than max_batch_size: runs alone, unsplit

    async def scenario():
        batcher.start()
        return await asyncio.gather(*(batcher.submit(request(i, rows)) for i, rows in enumerate(sizes)))

    results = serve(scenario())
    for i, (rows, result) in enumerate(zip(sizes, results)):
        assert_answered(result, i, rows)  # what the request computes alone
    assert len(run.batches) < len(sizes)
    assert max(len(set(ids)) for _, ids in run.batches) > 1
    assert [ids for _, ids in run.batches if big in ids] == [[big] * 20]
    assert all(len(ids) <= 8 for _, ids in run.batches if big not in ids)
    # First in, first out: the batches, in the order they ran, hold every row in submission order.
    assert [i for _, ids in run.batches for i in ids] == [i for i, rows in enumerate(sizes) for _ in range(rows)]
    assert pending(batcher) == 0
    on_loop = [thread == threading.get_ident() for thread in run.threads]  # serve() runs the loop here
    assert on_loop == [inline_work > 0 and len(ids) <= inline_work for _, ids in run.batches]


@pytest.mark.parametrize("inline_work", [0, INLINE_WORK], ids=["executor", "loop"])
def test_requests_with_different_keys_never_share_a_batch(executor, inline_work):
    run = Recorder()
    batcher = make_batcher(run, executor, max_batch_size=64, max_queue_delay=0.01, inline_work=inline_work)
    keys = [0, 0, 0, 10, 10, 0, 20, 20, 20, 0]

    async def scenario():
        batcher.start()
        return await asyncio.gather(*(batcher.submit(request(i), key=key) for i, key in enumerate(keys)))

    results = serve(scenario())
    for i, (key, result) in enumerate(zip(keys, results)):
        assert_answered(result, i, key=key)
    assert all(keys[i] == key for key, ids in run.batches for i in ids)
    assert [i for _, ids in run.batches for i in ids] == list(range(len(keys)))
    assert max(len(ids) for _, ids in run.batches) > 1


def test_full_queue_answers_queue_full_at_once(executor, gate):
    run = Recorder(gate)
    batcher = make_batcher(run, executor, max_batch_size=2, max_queue_delay=LONG_DELAY, max_queue_size=2)

    async def scenario():
        batcher.start()
        head = submit(batcher, 0, rows=2)
        await run.computing()
        queued = [submit(batcher, 1), submit(batcher, 2)]
        await until_pending(batcher, 3)
        # The gate is shut, so nothing can leave the queue: QueueFull cannot have waited for room.
        with pytest.raises(QueueFull, match="queue is full"):
            await batcher.submit(request(3))
        assert not any(call.done() for call in [head, *queued])
        gate.release(2)
        return await asyncio.gather(head, *queued)

    head, first, second = serve(scenario())
    assert_answered(head, 0, rows=2)
    assert_answered(first, 1)
    assert_answered(second, 2)
    assert run.batches == [(None, [0, 0]), (None, [1, 2])]


def test_a_batch_holds_at_most_max_work_unless_one_request_does(executor, gate):
    run = Recorder(gate)
    batcher = make_batcher(run, executor, max_batch_size=64, max_queue_delay=LONG_DELAY, max_work=5)
    sizes = [3, 2, 4, 1, 7, 1]  # rows, and work: 7 alone is over the cap and runs alone

    async def scenario():
        batcher.start()
        head = submit(batcher, 99, rows=64)
        await run.computing()
        calls = [submit(batcher, i, rows) for i, rows in enumerate(sizes)]
        await until_pending(batcher, 1 + len(sizes))
        batcher.drain()
        gate.release(100)
        return await asyncio.gather(head, *calls)

    head, *results = serve(scenario())
    for i, (rows, result) in enumerate(zip(sizes, results)):
        assert_answered(result, i, rows)
    batches = [ids for _, ids in run.batches[1:]]
    assert batches == [[0, 0, 0, 1, 1], [2, 2, 2, 2, 3], [4] * 7, [5]]


def test_queued_work_over_max_queued_work_is_queue_full_for_large_requests(executor, gate):
    run = Recorder(gate)
    batcher = make_batcher(run, executor, max_batch_size=64, max_queue_delay=LONG_DELAY, max_queued_work=10,
                           inline_work=2)  # fmt: skip

    async def scenario():
        batcher.start()
        head = submit(batcher, 0, rows=64)  # computing in the executor, held at the gate: the queue is empty
        await run.computing()
        alone = submit(batcher, 1, rows=12)  # over the cap, but alone in the queue: taken
        small = submit(batcher, 2, rows=2)  # small (work <= inline_work): the cap does not hold it back
        await until_pending(batcher, 3)
        with pytest.raises(QueueFull, match="queue holds 14 values of work, 3 more would pass its 10"):
            await batcher.submit(request(3, 3))
        gate.release(100)
        answers = await asyncio.gather(head, alone, small)
        batcher.drain()  # alone and small shared a batch: a lone request would now wait out the delay
        then = await batcher.submit(request(4, 4))  # the queue emptied: room again
        return *answers, then

    head, alone, small, then = serve(scenario())
    assert_answered(alone, 1, rows=12)
    assert_answered(small, 2, rows=2)
    assert_answered(then, 4, rows=4)
    assert pending(batcher) == 0


def test_request_past_its_deadline_in_the_queue_expires_before_compute(executor, gate):
    run = Recorder(gate)
    batcher = make_batcher(run, executor, max_batch_size=1, max_queue_delay=LONG_DELAY)

    async def scenario():
        loop = asyncio.get_running_loop()
        batcher.start()
        head = submit(batcher, 0)
        await run.computing()
        deadline = loop.time() + 0.02
        expiring = submit(batcher, 1, deadline=deadline)
        patient = submit(batcher, 2)
        await asyncio.sleep(0.05)
        assert loop.time() > deadline
        gate.release(2)
        return await asyncio.gather(head, expiring, patient, return_exceptions=True)

    head, expired, patient = serve(scenario())
    assert_answered(head, 0)
    assert isinstance(expired, RequestExpired) and "deadline passed" in str(expired)
    assert_answered(patient, 2)
    assert run.batches == [(None, [0]), (None, [2])]


def test_a_queue_slower_than_a_requests_deadline_refuses_it_at_once(executor, gate):
    run = Recorder(gate)
    batcher = make_batcher(run, executor, max_batch_size=1, max_queue_delay=LONG_DELAY)

    async def scenario():
        loop = asyncio.get_running_loop()
        batcher.start()
        head = submit(batcher, 0)
        await run.computing()
        queued = [submit(batcher, i) for i in (1, 2)]  # no deadline: always queued
        await asyncio.sleep(0.5)
        gate.release()  # the head's batch took 0.5 s or more: the batcher's recent time per batch
        assert_answered(await head, 0)
        await run.computing()  # request 1 computes; request 2 still queued
        with pytest.raises(QueueFull, match="deadline allows"):
            await batcher.submit(request(3), deadline=loop.time() + 0.05)
        patient = submit(batcher, 4, deadline=loop.time() + 2 * TIMEOUT)
        await until_pending(batcher, 3)
        gate.release(3)
        return await asyncio.gather(*queued, patient)

    for result, request_id in zip(serve(scenario()), (1, 2, 4)):
        assert_answered(result, request_id)
    assert [ids for _, ids in run.batches] == [[0], [1], [2], [4]]


def test_a_burst_after_quick_answers_is_not_refused_for_its_deadline(executor):
    run = Recorder()
    batcher = make_batcher(run, executor, max_batch_size=64, max_queue_delay=0.001, inline_work=INLINE_WORK)

    async def scenario():
        loop = asyncio.get_running_loop()
        batcher.start()
        for i in range(3):  # light load: one row at a time, each answered at once
            assert_answered(await submit(batcher, i), i)
        burst = [submit(batcher, 100 + i, deadline=loop.time() + TIMEOUT) for i in range(64)]
        return await asyncio.gather(*burst)

    for i, result in enumerate(serve(scenario())):
        assert_answered(result, 100 + i)


def test_requests_cancelled_while_their_batch_waits_leave_the_batcher_working(executor):
    run = Recorder()
    batcher = make_batcher(run, executor, max_batch_size=64, max_queue_delay=0.2, inline_work=INLINE_WORK)

    async def scenario():
        loop = asyncio.get_running_loop()
        errors = []
        loop.set_exception_handler(lambda loop, context: errors.append(context))
        batcher.start()
        await asyncio.gather(*(submit(batcher, i) for i in range(3)))  # recent batches held 3 requests
        waiting = [submit(batcher, i) for i in (3, 4)]  # fewer: they wait for the delay, the second arrived late
        await until_pending(batcher, 2)
        for call in waiting:
            call.cancel()
        await asyncio.sleep(0.3)  # the delay ends with nothing left in the queue
        answer = await asyncio.wait_for(submit(batcher, 5), TIMEOUT)
        return errors, answer

    errors, answer = serve(scenario())
    assert errors == []
    assert_answered(answer, 5)
    assert [ids for _, ids in run.batches] == [[0, 1, 2], [5]]


def test_cancelled_caller_is_dropped_before_compute(executor, gate):
    run = Recorder(gate)
    batcher = make_batcher(run, executor, max_batch_size=2, max_queue_delay=LONG_DELAY)

    async def scenario():
        batcher.start()
        head = submit(batcher, 0, rows=2)
        await run.computing()
        queued = [submit(batcher, i) for i in (1, 2, 3)]
        await until_pending(batcher, 4)
        queued[1].cancel()
        gate.release(2)
        answers = await asyncio.gather(head, queued[0], queued[2])
        return queued[1], answers

    cancelled, (head, first, last) = serve(scenario())
    assert cancelled.cancelled()
    assert_answered(head, 0, rows=2)
    assert_answered(first, 1)
    assert_answered(last, 3)
    assert run.batches == [(None, [0, 0]), (None, [1, 3])]
    assert pending(batcher) == 0


def test_failing_batch_fails_only_its_own_callers(executor, gate):
    run = Recorder(gate, poison=1)
    batcher = make_batcher(run, executor, max_batch_size=2, max_queue_delay=LONG_DELAY)

    async def scenario():
        batcher.start()
        head = submit(batcher, 0, rows=2)
        await run.computing()
        queued = [submit(batcher, i) for i in (1, 2, 3, 4)]
        await until_pending(batcher, 5)
        gate.release(3)
        return await asyncio.gather(head, *queued, return_exceptions=True)

    head, poisoned, neighbour, after, last = serve(scenario())
    assert_answered(head, 0, rows=2)
    for failed in (poisoned, neighbour):
        assert isinstance(failed, ValueError) and str(failed) == "request 1 is poison"
    assert_answered(after, 3)
    assert_answered(last, 4)
    assert run.batches == [(None, [0, 0]), (None, [1, 2]), (None, [3, 4])]


def test_failing_batch_on_the_loop_fails_only_its_own_callers(executor):
    run = Recorder(poison=1)
    batcher = make_batcher(run, executor, max_batch_size=8, max_queue_delay=0.01, inline_work=INLINE_WORK)

    async def scenario():
        batcher.start()
        # Submitted in one turn of the loop, so they queue together: [0], then [1, 2] of another key.
        calls = [submit(batcher, 0, key=0), submit(batcher, 1, key=1), submit(batcher, 2, key=1)]
        return await asyncio.gather(*calls, submit(batcher, 3, key=0), return_exceptions=True)

    first, poisoned, neighbour, last = serve(scenario())
    assert_answered(first, 0, key=0)
    for failed in (poisoned, neighbour):
        assert isinstance(failed, ValueError) and str(failed) == "request 1 is poison"
    assert_answered(last, 3, key=0)
    assert run.batches == [(0, [0]), (1, [1, 2]), (0, [3])]
    assert run.threads == [threading.get_ident()] * 3


def test_a_batch_the_executor_refuses_fails_its_callers_and_the_batcher_goes_on():
    pool = ThreadPoolExecutor(max_workers=1)
    pool.shutdown()
    batcher = make_batcher(Recorder(), pool, max_batch_size=8, max_queue_delay=0.01)

    async def scenario():
        batcher.start()
        answers = [await asyncio.wait_for(asyncio.gather(submit(batcher, i), return_exceptions=True), TIMEOUT)
                   for i in range(2)]  # fmt: skip
        await asyncio.wait_for(batcher.close(), TIMEOUT)
        return [answer for (answer,) in answers]

    for answer in serve(scenario()):
        assert isinstance(answer, RuntimeError) and "shutdown" in str(answer)


def test_close_answers_the_computing_batch_and_refuses_the_rest(executor, gate):
    run = Recorder(gate)
    batcher = make_batcher(run, executor, max_batch_size=2, max_queue_delay=LONG_DELAY)

    async def scenario():
        batcher.start()
        head = submit(batcher, 0, rows=2)
        await run.computing()
        computing, queued = [submit(batcher, 1), submit(batcher, 2)], submit(batcher, 3)
        await until_pending(batcher, 4)
        gate.release()  # the head batch ends; requests 1 and 2 compute together, held at the gate
        await run.computing()
        closing = asyncio.ensure_future(batcher.close())
        await asyncio.sleep(0)  # close() has begun: it waits for the computing batch
        with pytest.raises(ModelNotReady):
            await batcher.submit(request(4))
        assert not closing.done()
        gate.release()
        await closing
        with pytest.raises(ModelNotReady):
            await batcher.submit(request(5))
        return await asyncio.gather(head, *computing, queued, return_exceptions=True)

    head, first, second, queued = serve(scenario())
    assert_answered(head, 0, rows=2)
    assert_answered(first, 1)
    assert_answered(second, 2)
    assert isinstance(queued, ModelNotReady) and "stopped serving" in str(queued)
    assert run.batches == [(None, [0, 0]), (None, [1, 2])]
    assert pending(batcher) == 0


def test_drain_runs_queued_requests_without_waiting_for_the_delay(executor, gate):
    run = Recorder(gate)
    batcher = make_batcher(run, executor, max_batch_size=8, max_queue_delay=LONG_DELAY)

    async def scenario():
        batcher.start()
        # Two batches first, the second shared by three callers: after it, two queued requests wait
        # for a third or for the delay.
        head = submit(batcher, 0, rows=8)
        await run.computing()
        shared = [submit(batcher, 1, rows=2), submit(batcher, 2, rows=3), submit(batcher, 3, rows=3)]
        gate.release(2)
        await asyncio.gather(head, *shared)
        waiting = [submit(batcher, 4), submit(batcher, 5, rows=2)]
        await until_pending(batcher, 2)
        for _ in range(QUIET_TURNS + 10):
            await asyncio.sleep(0)
        assert len(run.batches) == 2 and not any(call.done() for call in waiting)
        batcher.drain()
        gate.release()
        return await asyncio.wait_for(asyncio.gather(*waiting), TIMEOUT)  # well short of the 10 s delay

    first, second = serve(scenario())
    assert_answered(first, 4)
    assert_answered(second, 5, rows=2)
    assert run.batches[1:] == [(None, [1, 1, 2, 2, 2, 3, 3, 3]), (None, [4, 5, 5])]


def test_as_many_requests_as_recent_batches_start_without_the_delay(executor):
    run = Recorder()
    batcher = make_batcher(run, executor, max_batch_size=64, max_queue_delay=0.2, inline_work=INLINE_WORK)
    # (request ids submitted in one turn of the loop, as callers in a loop come back together; whether
    # they wait for the delay). The target is the last batch's count, or one less than the target before.
    rounds = [([0], False), ([1, 2, 3], False), ([4, 5, 6], False), ([7], True), ([8], True), ([9], False)]

    async def scenario():
        batcher.start()
        for ids, waits in rounds:
            calls = [submit(batcher, i) for i in ids]
            for _ in range(QUIET_TURNS + 10):  # enough turns of the loop to start and run a batch, far short of 0.2 s
                await asyncio.sleep(0)
            assert [call.done() for call in calls] == [not waits] * len(ids), f"round {ids}"
            for i, result in zip(ids, await asyncio.wait_for(asyncio.gather(*calls), TIMEOUT)):
                assert_answered(result, i)

    serve(scenario())
    assert run.batches == [(None, ids) for ids, _ in rounds]


def test_after_an_idle_spell_longer_than_the_delay_a_lone_request_starts_at_once(executor):
    run = Recorder()
    batcher = make_batcher(run, executor, max_batch_size=64, max_queue_delay=0.2, inline_work=INLINE_WORK)

    async def scenario():
        batcher.start()
        await asyncio.gather(*(submit(batcher, i) for i in range(3)))  # recent batches held three
        await asyncio.sleep(0.3)
        lone = submit(batcher, 3)
        for _ in range(QUIET_TURNS + 10):
            await asyncio.sleep(0)
        assert lone.done()
        return lone.result()

    assert_answered(serve(scenario()), 3)
    assert run.batches == [(None, [0, 1, 2]), (None, [3])]


def test_requests_that_join_a_starting_batch_are_not_refused(executor):
    run = Recorder()
    batcher = make_batcher(run, executor, max_batch_size=8, max_queue_delay=LONG_DELAY, max_queue_size=1,
                           inline_work=INLINE_WORK)  # fmt: skip

    async def scenario():
        batcher.start()
        # Idle batcher: the first request's batch starts on the next turn; the others of this turn join it.
        return await asyncio.wait_for(asyncio.gather(*(submit(batcher, i) for i in range(3))), TIMEOUT)

    for i, result in enumerate(serve(scenario())):
        assert_answered(result, i)
    assert run.batches == [(None, [0, 1, 2])]


@pytest.mark.parametrize("gap", [1, QUIET_TURNS - 2])
def test_a_batch_waits_while_requests_keep_arriving(executor, gap):
    run = Recorder()
    batcher = make_batcher(run, executor, max_batch_size=64, max_queue_delay=LONG_DELAY, inline_work=INLINE_WORK)

    async def scenario():
        batcher.start()
        calls = [submit(batcher, 0), submit(batcher, 1)]  # two callers at once: concurrent callers
        for i in range(2, 4):  # then one arrival every `gap` turns of the loop, fewer than QUIET_TURNS apart
            for _ in range(gap):
                await asyncio.sleep(0)
            calls.append(submit(batcher, i))
        return await asyncio.wait_for(asyncio.gather(*calls), TIMEOUT)

    for i, result in enumerate(serve(scenario())):
        assert_answered(result, i)
    assert run.batches == [(None, [0, 1, 2, 3])]


def test_a_lone_request_after_lone_batches_waits_one_turn_only(executor):
    run = Recorder()
    batcher = make_batcher(run, executor, max_batch_size=64, max_queue_delay=LONG_DELAY, inline_work=INLINE_WORK)

    async def scenario():
        batcher.start()
        first = submit(batcher, 0)
        for _ in range(4):  # one caller: no quiet turns to wait out, far fewer than QUIET_TURNS
            await asyncio.sleep(0)
        assert first.done()
        return await first

    assert_answered(serve(scenario()), 0)
    assert run.batches == [(None, [0])]


def test_a_batch_starts_once_arrivals_pause_for_quiet_turns(executor):
    run = Recorder()
    batcher = make_batcher(run, executor, max_batch_size=64, max_queue_delay=LONG_DELAY, inline_work=INLINE_WORK)

    async def scenario():
        batcher.start()
        first = submit(batcher, 0)
        for _ in range(QUIET_TURNS + 4):  # a lone request (the target is one) waits out the quiet turns, not the delay
            await asyncio.sleep(0)
        assert first.done()
        second = submit(batcher, 1)
        return await asyncio.wait_for(asyncio.gather(first, second), TIMEOUT)

    for i, result in enumerate(serve(scenario())):
        assert_answered(result, i)
    assert run.batches == [(None, [0]), (None, [1])]


def test_full_score_queue_is_resource_exhausted_over_grpc(model_repository, start_server):
    from vaeserve.service.client import AsyncClient

    calls = 8
    # Two slow Score requests (256 rows with K=1024: a fraction of a second each, in the executor) fill
    # the batcher: one computes, the other fills the queue of one. Calls sent meanwhile are refused.
    server = start_server(model_repository, max_queue_size=1, max_batch_size=256)
    key = ("vaeserve_pending_requests", (("graph", "score"), ("model", "vae")))
    try:
        server.wait_serving()

        async def scenario():
            async with AsyncClient(server.target, timeout=60) as client:
                x = np.ones((256, 64), np.float32)
                slow = [asyncio.ensure_future(client.score("vae", x + i, iw_samples=1024)) for i in range(2)]
                for _ in range(1000):
                    if (await asyncio.to_thread(server.metrics)).get(key, 0) == 2:
                        break
                    await asyncio.sleep(0.005)
                else:
                    pytest.fail("the slow requests never showed as pending")
                refused = await asyncio.gather(*(client.score("vae", x[:1] + i) for i in range(calls)), return_exceptions=True)
                return await asyncio.gather(*slow), refused

        answered, refused = asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        server.stop()
    assert len(refused) == calls
    for err in refused:
        assert isinstance(err, grpc.aio.AioRpcError) and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "score queue is full" in err.details()
    for result in answered:
        assert len(result.neg_elbo) == 256 and np.isfinite(result.neg_iw).all()
