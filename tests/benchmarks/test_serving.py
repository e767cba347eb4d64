"""bench serve's CPU time per call (benchmarks/serving.py): read from the threads of a real process, over the
measured window only, and divided by the calls measured."""

import asyncio
import os
import threading
import time

import pytest

from vaeserve.benchmarks import serving

pytestmark = pytest.mark.skipif(not os.path.isdir(f"/proc/{os.getpid()}/task"), reason="reads /proc (Linux)")


def spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_cpu_counts_the_main_thread_and_every_other_thread():
    spun, release = threading.Event(), threading.Event()

    def work():
        spin(0.3)
        spun.set()
        release.wait(10)  # still alive when read: a thread that has ended is not counted

    before = serving._cpu(os.getpid())
    worker = threading.Thread(target=work)
    worker.start()
    spin(0.2)  # the main thread's
    assert spun.wait(10)
    after = serving._cpu(os.getpid())
    release.set()
    worker.join()
    main, total = serving._cpu_between(os.getpid(), before, after)
    assert 0.2 <= main < 0.3
    assert 0.5 <= total < 0.7
    assert serving._cpu(None) is None and serving._cpu(2**22 + 12345) is None  # no such process


def test_measure_gives_cpu_per_measured_call():
    calls = 0

    async def busy(state, latencies):
        nonlocal calls
        while not state["stop"]:
            start = time.perf_counter()
            spin(0.002)  # 2 ms of CPU per call, on this process's main thread
            await asyncio.sleep(0)
            if state["measure"]:
                latencies.append(time.perf_counter() - start)
                calls += 1

    result = asyncio.run(serving._measure(lambda state, latencies: [busy(state, latencies)], 0.4, server_pid=os.getpid()))
    assert calls > 50
    # The "server" is this process: 2 ms a call, give or take the loop's own work and the clock's grain.
    assert 1900 <= result["loop_cpu_us"] <= 2600
    assert result["server_cpu_us"] >= result["loop_cpu_us"]
    assert result["client_cpu_us"] >= 1900  # the load generator is this process too
    assert "server_cpu_us" not in asyncio.run(serving._measure(lambda state, latencies: [busy(state, latencies)], 0.1))
