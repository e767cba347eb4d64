"""Health transitions, draining on SIGTERM without failing in-flight requests, and metrics counters."""

import asyncio

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
IN_FLIGHT = 8
CLIENT_SEND_FAILED = "SendMessageOperation"  # in debug_error_string: the client's own write failed


def test_health_and_sigterm_during_load(model_repository, start_server, wait_admitted):
    from vaeserve.service.client import AsyncClient

    # A long warm-up keeps the server NOT_SERVING for a while. Requests of max_batch_size rows with a large
    # K each run as a batch of their own, a fraction of a second each, so they queue behind one another.
    server = start_server(model_repository, warmup_rows=300_000, max_batch_size=256)
    try:
        seen = server.wait_serving()
        assert NOT_SERVING in seen and seen[-1] == SERVING
        assert set(seen) <= {None, NOT_SERVING, SERVING}
        assert server.health("vaeserve.v1.Inference") == SERVING

        async def scenario():
            async with AsyncClient(server.target) as client:
                channel = grpc.aio.insecure_channel(server.target)
                watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
                assert (await watch.read()).status == SERVING
                x = np.ones((256, 64), np.float32)
                calls = [asyncio.ensure_future(client.score("vae", x + i, iw_samples=512)) for i in range(IN_FLIGHT)]
                # Wait until every request is in the Score queue (or answered), then ask the server to stop.
                await wait_admitted(server, "vae", IN_FLIGHT)
                server.process.send_signal(15)
                assert (await watch.read()).status == NOT_SERVING
                watch.cancel()
                await channel.close()
                return await asyncio.gather(*calls)

        results = asyncio.run(scenario())
        assert len(results) == IN_FLIGHT and all(len(r.neg_elbo) == 256 and np.isfinite(r.neg_iw).all() for r in results)
        assert server.process.wait(30) == 0
    finally:
        server.stop()


def test_metrics_count_requests(server, client, rows):
    x, labels = rows

    def count(method, model, code="OK", version="1"):
        key = ("vaeserve_requests_total", (("code", code), ("method", method), ("model", model), ("version", version)))
        return server.metrics().get(key, 0.0)

    before = {m: count(m, "cvae") for m in ("Score", "Embed")}
    bad_before = count("Score", "cvae", "INVALID_ARGUMENT")
    for _ in range(3):
        client.score("cvae", x)
    client.embed("cvae", x, labels)
    with pytest.raises(grpc.RpcError):
        client.score("cvae", x, ["nope"] * len(x))
    assert count("Score", "cvae") == before["Score"] + 3
    assert count("Embed", "cvae") == before["Embed"] + 1
    assert count("Score", "cvae", "INVALID_ARGUMENT") == bad_before + 1
    metrics = server.metrics()
    for graph in ("encoder", "decoder", "score"):
        assert metrics[("vaeserve_model_info", (("graph", graph), ("model", "cvae"), ("provider", "CPUExecutionProvider"), ("version", "1")))] == 1
    assert metrics[("vaeserve_request_latency_seconds_count", (("method", "Score"), ("model", "cvae"), ("version", "1")))] >= 4
    assert ("process_cpu_seconds_total", ()) in metrics


@pytest.mark.parametrize("callers", [8, 64])  # 8 leave gaps between calls: a drain must not end in one
def test_sigterm_under_single_row_callers_fails_no_call_sent_before_unavailable(model_repository, start_server, callers):
    from vaeserve.artifact.repository import load_version
    from vaeserve.benchmarks.drain import sigterm_under_load
    from vaeserve.service.status import DRAINING_MESSAGE

    server = start_server(model_repository, drain_notice_seconds=1.0)
    try:
        server.wait_serving()
        manifest = load_version(model_repository / "vae" / "1").manifest
        r = asyncio.run(sigterm_under_load(server, manifest, callers=callers, before=1.0, seconds=20.0))
    finally:
        server.stop()
    calls = r["calls"]
    assert set(calls["before"]) == {"OK"} and calls["before"]["OK"] > callers
    assert set(calls["notice"]) <= {"OK", "UNAVAILABLE"} and calls["notice"]["OK"] > 0  # still served while NOT_SERVING
    assert set(calls.get("after", {})) <= {"UNAVAILABLE"}
    assert r["messages"] == {"UNAVAILABLE": DRAINING_MESSAGE}
    assert r["not_serving_after_s"] is not None and r["not_serving_after_s"] < 1.0 <= r["unavailable_after_s"]
    assert r["exit_code"] == 0


def test_a_second_sigterm_skips_the_rest_of_the_notice(model_repository, start_server):
    import time

    server = start_server(model_repository, drain_notice_seconds=60.0)
    try:
        server.wait_serving()
        server.process.send_signal(15)
        for _ in range(100):  # the notice has begun once health says NOT_SERVING
            if server.health() == NOT_SERVING:
                break
            time.sleep(0.05)
        assert server.health() == NOT_SERVING
        start = time.monotonic()
        server.process.send_signal(15)
        assert server.process.wait(30) == 0
        assert time.monotonic() - start < 30
    finally:
        server.stop()


def test_calls_above_the_concurrency_limit_are_resource_exhausted_at_once(model_repository, start_server):
    from vaeserve.service.client import AsyncClient

    server = start_server(model_repository, max_concurrent_rpcs=2)
    try:
        server.wait_serving()

        async def burst():
            async with AsyncClient(server.target) as client:
                x = np.full((256, 64), 0.5, np.float32)
                calls = [client.score("vae", x, iw_samples=256) for _ in range(8)]
                return await asyncio.gather(*calls, return_exceptions=True)

        results = asyncio.run(burst())
        counted = server.metrics()[("vaeserve_rejected_total", (("reason", "overloaded"),))]
    finally:
        server.stop()
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    answered = [r for r in results if not isinstance(r, BaseException)]
    assert refused and answered and len(refused) + len(answered) == 8
    # Ours, counted; and, for calls that arrive before a handler has run for the others, gRPC's own at 2x.
    ours = "the server holds 2 calls, its max_concurrent_rpcs; retry later"
    assert {r.code() for r in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert {r.details() for r in refused} <= {ours, "Concurrent RPC limit exceeded!"}
    assert counted == sum(r.details() == ours for r in refused)
    assert all(len(r.neg_elbo) == 256 and np.isfinite(r.neg_iw).all() for r in answered)


def test_open_streams_end_unavailable_at_the_drain_after_their_answers(model_repository, start_server):
    """A stream that keeps sending and one left idle: both are answered through the notice, then end with
    UNAVAILABLE, and the drain does not wait for them to close (the process exits long before drain_seconds)."""
    import time

    from vaeserve.service.client import to_tensor
    from vaeserve.service.status import DRAINING_MESSAGE
    from vaeserve.v1 import vaeserve_pb2 as pb
    from vaeserve.v1 import vaeserve_pb2_grpc as pb_grpc

    server = start_server(model_repository, drain_notice_seconds=0.5, drain_seconds=30.0)
    request = pb.ScoreRequest(model="vae", x=to_tensor(np.full((1, 64), 0.5, np.float32)))
    try:
        server.wait_serving()

        async def stream(stub, keep_sending: bool, signal_after: int | None):
            async def requests():
                for i in range(3000):  # at most 30 s of messages
                    if i >= 5 and not keep_sending:
                        await asyncio.sleep(60)  # idle, never half-closed
                    yield request
                    await asyncio.sleep(0.01)

            answered = 0
            try:
                async for reply in stub.ScoreStream(requests()):
                    assert reply.WhichOneof("result") == "score" and len(reply.score.neg_elbo) == 1
                    answered += 1
                    if answered == signal_after:
                        server.process.send_signal(15)
            except grpc.aio.AioRpcError as err:
                if keep_sending and CLIENT_SEND_FAILED in err.debug_error_string():
                    # grpc's Python client, writing when the stream ended, fails its own write and reports
                    # INTERNAL instead of the status the server sent (the server did send UNAVAILABLE)
                    return answered, grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE, time.monotonic()
                return answered, err.code(), err.details(), time.monotonic()
            return answered, None, None, time.monotonic()

        async def scenario():
            async with grpc.aio.insecure_channel(server.target) as channel:
                stub = pb_grpc.InferenceStub(channel)
                return await asyncio.gather(stream(stub, True, 20), stream(stub, False, None))

        busy, idle = asyncio.run(scenario())
        exit_code = server.process.wait(30)
        ended = time.monotonic()
    finally:
        server.stop()
    assert busy[0] > 20 and busy[1:3] == (grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE)  # answered through the notice
    assert idle[0] == 5 and idle[1:3] == (grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE)
    assert exit_code == 0 and ended - busy[3] < 10


def test_oip_probes_during_the_drain(model_repository, start_server):
    """ServerReady says false as soon as the drain's notice begins, ServerLive stays true, and neither is
    refused: a probe must not fail because the server is busy or on its way out."""
    import time

    from vaeserve.oip.v2 import predict_pb2 as oip_pb

    server = start_server(model_repository, drain_notice_seconds=1.0, drain_seconds=5.0)
    try:
        server.wait_serving()
        with grpc.insecure_channel(server.target) as channel:
            def probe(method, request, response):
                call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}", request_serializer=request.SerializeToString,
                                           response_deserializer=response.FromString)  # fmt: skip
                return call(request, timeout=5)

            def ready():
                return probe("ServerReady", oip_pb.ServerReadyRequest(), oip_pb.ServerReadyResponse).ready

            assert ready() and server.health("inference.GRPCInferenceService") == SERVING
            server.process.send_signal(15)
            for _ in range(100):
                if server.health() == NOT_SERVING:
                    break
                time.sleep(0.02)
            assert not ready()
            assert probe("ServerLive", oip_pb.ServerLiveRequest(), oip_pb.ServerLiveResponse).live
        assert server.process.wait(30) == 0
    finally:
        server.stop()
