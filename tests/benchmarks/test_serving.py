"""bench serve (benchmarks/serving.py): its CPU time per call, from harness.cpu_seconds, read from /proc for
a real process over the measured window only and divided by the calls measured; and its reference servers,
the bare echo and the echo shaped like Score, on a real grpc.aio server."""

import asyncio
import os
import threading
import time

import pytest

from vaeserve.benchmarks import serving
from vaeserve.benchmarks.harness import cpu_seconds

pytestmark = pytest.mark.skipif(not os.path.isdir(f"/proc/{os.getpid()}/task"), reason="reads /proc (Linux)")


def spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_cpu_seconds_counts_the_main_thread_and_every_thread_of_the_process():
    before = cpu_seconds(os.getpid())
    worker = threading.Thread(target=spin, args=(0.3,))
    worker.start()
    spin(0.2)  # the main thread's
    worker.join()  # a thread that has ended still counts in the process's total
    after = cpu_seconds(os.getpid())
    main, total = after[0] - before[0], after[1] - before[1]
    assert 0.2 <= main < 0.3
    assert 0.48 <= total < 0.7  # clock ticks: 10 ms grain
    assert cpu_seconds(2**22 + 12345) is None  # no such process


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
    tick_per_call = 1e6 / os.sysconf("SC_CLK_TCK") / calls  # the process's total is read in clock ticks
    assert result["server_cpu_us"] >= result["loop_cpu_us"] - 2 * tick_per_call
    assert result["client_cpu_us"] >= 1900  # the load generator is this process too
    assert "server_cpu_us" not in asyncio.run(serving._measure(lambda state, latencies: [busy(state, latencies)], 0.1))


def test_the_echo_server_answers_bytes_back_and_score_shaped_calls_with_a_score_reply():
    """bench serve's reference servers: Echo returns the request's bytes; Shaped parses a ScoreRequest (a
    request that is not one fails) and answers the one-row ScoreResponse a default Score gives."""
    import grpc
    import numpy as np

    from vaeserve.benchmarks.harness import free_port
    from vaeserve.v1 import vaeserve_pb2 as pb

    x = np.arange(64, dtype="<f4").reshape(1, 64)
    payload = pb.ScoreRequest(model="digits", x=pb.Tensor(shape=x.shape, data=x.tobytes())).SerializeToString()

    async def scenario():
        port = free_port()
        server = await serving._echo_server(port)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                echoed = await channel.unary_unary("/bench.Echo/Echo")(payload, timeout=5)
                shaped = await channel.unary_unary("/bench.Echo/Shaped")(payload, timeout=5)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await channel.unary_unary("/bench.Echo/Shaped")(b"\xff\xff\xff", timeout=5)
                return echoed, shaped, refused.value.code()
        finally:
            await server.stop(0)

    echoed, shaped, code = asyncio.run(scenario())
    assert echoed == payload
    reply = pb.ScoreResponse.FromString(shaped)
    assert reply == serving.shaped_reply()
    assert len(reply.neg_elbo) == len(reply.anomaly_score) == len(reply.p_value) == len(reply.is_anomaly) == 1
    assert code == grpc.StatusCode.UNKNOWN  # grpc.aio's answer to bytes its deserializer rejects
