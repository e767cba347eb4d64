"""When the server hands freed memory back (service/memory.py), on a real event loop: once no RPC is in
flight after a large batch, also when the batch's callers have all gone before it finished, and never
while an RPC is inside a handler."""

import asyncio

import pytest

from vaeserve.service import memory

IDLE = 0.05  # seconds, instead of IDLE_SECONDS


@pytest.fixture
def trims(monkeypatch):
    """The times memory.trim ran (it still runs: malloc_trim is harmless)."""
    calls = []
    real = memory.trim
    monkeypatch.setattr(memory, "IDLE_SECONDS", IDLE)
    monkeypatch.setattr(memory, "trim", lambda: (calls.append(asyncio.get_running_loop().time()), real()))
    monkeypatch.setattr(memory, "_in_flight", 0)
    monkeypatch.setattr(memory, "_held", False)
    return calls


def run(scenario):
    return asyncio.run(asyncio.wait_for(scenario(), 5))


@pytest.mark.skipif(memory._malloc_trim is None, reason="not glibc: nothing to hand back")
def test_trim_once_idle_after_a_large_batch(trims):
    async def scenario():
        loop = asyncio.get_running_loop()
        memory.rpc_started()
        memory.large_batch_done(loop)  # its caller is still in the handler: no trim yet
        await asyncio.sleep(3 * IDLE)
        assert trims == []
        finished = loop.time()
        memory.rpc_finished(loop)
        await asyncio.sleep(3 * IDLE)
        assert len(trims) == 1 and trims[0] - finished >= IDLE
        memory.rpc_started()  # an RPC without a large batch arms nothing
        memory.rpc_finished(loop)
        await asyncio.sleep(3 * IDLE)
        assert len(trims) == 1

    run(scenario)


@pytest.mark.skipif(memory._malloc_trim is None, reason="not glibc: nothing to hand back")
def test_trim_when_the_callers_of_a_large_batch_have_gone(trims):
    async def scenario():
        loop = asyncio.get_running_loop()
        memory.rpc_started()
        memory.rpc_finished(loop)  # the caller gave up (deadline) while its batch computed
        memory.large_batch_done(loop)
        await asyncio.sleep(3 * IDLE)
        assert len(trims) == 1

    run(scenario)


@pytest.mark.skipif(memory._malloc_trim is None, reason="not glibc: nothing to hand back")
def test_no_trim_while_an_rpc_is_in_flight(trims):
    async def scenario():
        loop = asyncio.get_running_loop()
        memory.large_batch_done(loop)  # idle: armed
        memory.rpc_started()  # busy again before the timer fires
        await asyncio.sleep(3 * IDLE)
        assert trims == []
        memory.rpc_finished(loop)  # idle again: the held memory is still to hand back
        await asyncio.sleep(3 * IDLE)
        assert len(trims) == 1

    run(scenario)

