"""`vaeserve bench serve`: throughput and latency of the gRPC service on loopback (not a test).

Single-row Score at 1, 8 and 64 concurrent callers, batching on and off, beside a bare grpc.aio echo
server carrying the same payload and the same server shaped like Score (the request parsed, one await,
a one-row ScoreResponse: what gRPC and protobuf alone cost a Score call, so the rest is the model's path);
256-row Score at 8 callers beside in-process floors in glibc's fast
state (raw ONNX Runtime encoder + decoder, the version's graphs, its Scorer: _floors) and on
FRESH_SERVERS fresh servers; --workers 1 vs 2; the Open Inference Protocol's ModelInfer and ScoreStream
beside Score on one server, in alternating rounds. Servers run as subprocesses of
`vaeserve serve`; the load generator is one asyncio process on the same box with CONNECTIONS gRPC
connections, as for the echo server.

A small shared box drifts by ±10% within a minute, so echo and single-row Score with batching on are
measured in alternating rounds (--rounds: echo, shaped echo, Score); each point reports its median
round, and each ratio is the median of the rounds' ratios. Loops are bounded by --seconds per point and round.

Each point of a one-worker server (and of the echo server) also prints the CPU time per call, over the
same window: the server's in all, its main thread's (the event loop, which also runs small batches), and
the load generator's, which shares the box: whether the server's loop thread, its compute threads or the
box bounds a ratio shows there. The server's total is read in clock ticks (harness.cpu_seconds), a few
microseconds a call over a 3 s point.
"""

import contextlib

from vaeserve.benchmarks.harness import cpu_seconds, free_port, model_version, start_server


def run(args) -> int:
    import asyncio
    import json

    from vaeserve.errors import ConfigError

    if args.rounds < 1 or args.seconds <= 0:
        raise ConfigError("--rounds must be at least 1 and --seconds positive")
    version = model_version(args.repository, args.model)
    results = asyncio.run(_run_all(args, version))
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


CONNECTIONS = 4  # the load generator's gRPC connections, so --workers (SO_REUSEPORT) spreads load


@contextlib.asynccontextmanager
async def _channels(target: str):
    """CONNECTIONS ready channels that do not share a TCP connection (SO_REUSEPORT balances connections,
    not requests; without a local subchannel pool grpc would reuse one connection for all)."""
    import grpc

    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_send_message_length", 1 << 28)]
    channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(CONNECTIONS)]
    try:
        for channel in channels:
            await channel.channel_ready()
        yield channels
    finally:
        for channel in channels:
            await channel.close()


async def _measure(workers, seconds: float, rows: int = 1, server_pid: int | None = None) -> dict:
    """Run the coroutines workers(state, latencies) make until state["stop"], measuring for `seconds` after
    a short warm-up; each appends a call's latency in seconds while state["measure"]. With `server_pid`,
    also the CPU time per call of that server and of this load generator over the same window."""
    import asyncio
    import time

    latencies: list[float] = []
    state = {"measure": False, "stop": False}
    tasks = [asyncio.ensure_future(worker) for worker in workers(state, latencies)]
    await asyncio.sleep(min(0.5, seconds / 4))
    state["measure"] = True
    before = None if server_pid is None else cpu_seconds(server_pid), time.process_time()
    start = time.perf_counter()
    await asyncio.sleep(seconds)
    state["stop"] = True
    elapsed = time.perf_counter() - start
    after = None if server_pid is None else cpu_seconds(server_pid), time.process_time()
    await asyncio.gather(*tasks)
    summary = _summary(latencies, elapsed, rows)
    if before[0] is not None and after[0] is not None and latencies:
        per_call = 1e6 / len(latencies)
        summary["loop_cpu_us"] = (after[0][0] - before[0][0]) * per_call
        summary["server_cpu_us"] = (after[0][1] - before[0][1]) * per_call
        summary["client_cpu_us"] = (after[1] - before[1]) * per_call
    return summary


def _summary(latencies: list[float], elapsed: float, rows: int) -> dict:
    """Calls per second, rows per second and latency percentiles of calls that took `latencies` seconds."""
    import numpy as np

    lat = np.asarray(latencies) * 1000
    p50, p99 = np.percentile(lat, [50, 99]) if len(lat) else (float("nan"), float("nan"))
    return {"req_s": len(lat) / elapsed, "rows_s": len(lat) * rows / elapsed, "p50_ms": float(p50), "p99_ms": float(p99)}


async def _load(calls, callers: int, seconds: float, rows: int = 1, server_pid: int | None = None) -> dict:
    """`callers` loops calling one of `calls` (round robin) back to back for `seconds` after a short warm-up;
    with `server_pid`, CPU per call too (_measure)."""
    import time

    async def caller(call, state, latencies):
        while not state["stop"]:
            start = time.perf_counter()
            await call()
            if state["measure"]:
                latencies.append(time.perf_counter() - start)

    return await _measure(lambda state, latencies: [caller(calls[i % len(calls)], state, latencies) for i in range(callers)],
                          seconds, rows, server_pid)  # fmt: skip


def shaped_reply():
    """A one-row ScoreResponse with the fields a default Score fills, for the echo shaped like Score."""
    from vaeserve.v1 import vaeserve_pb2 as pb

    return pb.ScoreResponse(model="digits", version=1, threshold=9.15, neg_elbo=[23.4], reconstruction=[19.8], kl=[3.6],
                            is_anomaly=[False], out_of_support=[False], anomaly_score=[2.1], p_value=[0.41],
                            knn_distance=[0.73])  # fmt: skip


async def _echo_server(port: int):
    """The bare echo (Echo: bytes back, no protobuf), and the same server shaped like Score (Shaped: the
    ScoreRequest parsed, one await of a future set on the loop's next turn as Score awaits its batch, a fixed
    one-row ScoreResponse serialized): gRPC's and protobuf's part of a Score call, without the model's."""
    import asyncio

    import grpc

    from vaeserve.v1 import vaeserve_pb2 as pb

    reply = shaped_reply()

    def identity(b):
        return b

    async def echo(request, context):
        return request

    async def shaped(request, context):
        loop = asyncio.get_running_loop()
        batch = loop.create_future()
        loop.call_soon(batch.set_result, None)
        await batch
        return reply

    server = grpc.aio.server()
    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(echo, request_deserializer=identity, response_serializer=identity),
        "Shaped": grpc.unary_unary_rpc_method_handler(shaped, request_deserializer=pb.ScoreRequest.FromString,
                                                      response_serializer=pb.ScoreResponse.SerializeToString),
    }  # fmt: skip
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("bench.Echo", handlers)])
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server


def _echo_main(port: int) -> None:
    import asyncio

    async def main():
        server = await _echo_server(port)
        await server.wait_for_termination()

    asyncio.run(main())


async def _run_all(args, version) -> dict:
    import asyncio
    import multiprocessing

    import grpc
    import numpy as np

    from vaeserve.v1 import vaeserve_pb2 as pb
    from vaeserve.v1 import vaeserve_pb2_grpc as pb_grpc

    manifest = version.manifest
    features, support = manifest.input.features, manifest.support
    rng = np.random.default_rng(0)

    def raw_rows(n):  # uniform inside the model's support
        return (support.low + rng.random((n, features)) * (support.high - support.low)).astype(np.float32)

    def score_request(n):
        x = np.ascontiguousarray(raw_rows(n), "<f4")
        return pb.ScoreRequest(model=version.name, x=pb.Tensor(shape=x.shape, data=x.tobytes()))

    single, bulk = score_request(1), score_request(256)
    callers = [int(c) for c in args.callers.split(",")]
    results: dict = {"model": version.name, "features": features, "payload_bytes": single.ByteSize()}
    print(f"model {version.name} v{version.version} ({manifest.model.kind}, {features} features); "
          f"single-row Score request {single.ByteSize()} bytes; {args.seconds:g} s per point")  # fmt: skip

    def report(label, r):
        cpu = (f"   CPU/call: server {r['server_cpu_us']:,.0f} us (loop thread {r['loop_cpu_us']:,.0f}), load generator "
               f"{r['client_cpu_us']:,.0f} us" if "server_cpu_us" in r else "")  # fmt: skip
        print(f"  {label:<44} {r['req_s']:>9.0f} req/s {r['rows_s']:>10.0f} rows/s   p50 {r['p50_ms']:6.2f} ms   p99 {r['p99_ms']:6.2f} ms{cpu}")
        results[label] = r

    # Bare grpc.aio echo server, same payload, in its own process like the real server; it idles while
    # it is not the one being measured.
    port = free_port()
    echo = multiprocessing.get_context("spawn").Process(target=_echo_main, args=(port,), daemon=True)
    echo.start()
    payload = single.SerializeToString()
    print(f"echo server: grpc.aio, same payload; {CONNECTIONS} connections to each server")
    try:
        async with _channels(f"127.0.0.1:{port}") as channels:
            echo_calls, shaped_calls = ([lambda call=c.unary_unary(f"/bench.Echo/{method}"): call(payload) for c in channels]
                                        for method in ("Echo", "Shaped"))  # fmt: skip

            async def against(label, settings, plan, paired=False):
                """Load a server started with `settings` with each point of `plan`; when `paired`, single-row
                points take --rounds rounds, each after a round on the echo server with the same callers."""
                server = start_server(args.repository, **settings)
                target = server.target
                try:
                    await asyncio.to_thread(server.wait_serving)
                    print(label)
                    async with _channels(target) as score_channels:
                        stubs = [pb_grpc.InferenceStub(c) for c in score_channels]
                        pid = server.process.pid if settings.get("workers", 1) == 1 else None  # not a supervisor's
                        for point, request, n, rows in plan:
                            calls = [lambda stub=stub, request=request: stub.Score(request) for stub in stubs]
                            if rows > 1 or not paired:
                                report(point, await _load(calls, n, args.seconds, rows, pid))
                                continue
                            rounds = [(await _load(echo_calls, n, args.seconds, server_pid=echo.pid),
                                       await _load(shaped_calls, n, args.seconds, server_pid=echo.pid),
                                       await _load(calls, n, args.seconds, server_pid=pid)) for _ in range(args.rounds)]  # fmt: skip
                            report(f"echo {n} callers", _median_round([e for e, _, _ in rounds]))
                            report(f"echo shaped like Score, {n} callers", _median_round([h for _, h, _ in rounds]))
                            report(point, _median_round([r for _, _, r in rounds]))
                            for label, key, pairs in (("to echo", "ratio to echo", [(e, r) for e, _, r in rounds]),
                                                      ("shaped echo to echo", "ratio of shaped echo to echo", [(e, h) for e, h, _ in rounds]),
                                                      ("to shaped echo", "ratio to shaped echo", [(h, r) for _, h, r in rounds])):  # fmt: skip
                                ratios = sorted(b["req_s"] / a["req_s"] for a, b in pairs)
                                ratio = results[f"{key}, {n} callers"] = ratios[len(ratios) // 2]
                                print(f"  {'':<44} {label}: {ratio:.2f} (rounds: {', '.join(f'{r:.2f}' for r in ratios)})")
                finally:
                    server.stop(60)

            only = {"warmup_rows": 64}
            from vaeserve.service.settings import Settings

            delay = Settings.max_queue_delay_ms if args.max_queue_delay_ms is None else args.max_queue_delay_ms
            await against(f"vaeserve, batching on (max_batch_size 256, max_queue_delay {delay:g} ms), 1 worker; "
                          f"single-row points alternate with echo, median of {args.rounds} rounds",
                          dict(only, max_batch_size=256, max_queue_delay_ms=delay),
                          [(f"score 1 row, {n} callers, batching on", single, n, 1) for n in callers]
                          + [("score 256 rows, 8 callers, batching on", bulk, 8, 256)], paired=True)  # fmt: skip
            await against("vaeserve, batching off (max_batch_size 1: every request runs alone), 1 worker",
                          dict(only, max_batch_size=1, max_queue_delay_ms=0),
                          [(f"score 1 row, {n} callers, batching off", single, n, 1) for n in callers])  # fmt: skip
            await against("vaeserve, batching on, 2 workers (SO_REUSEPORT)",
                          dict(only, max_batch_size=256, max_queue_delay_ms=delay, workers=2),
                          [(f"score 1 row, {n} callers, 2 workers", single, n, 1) for n in callers if n > 1]
                          + [("score 256 rows, 8 callers, 2 workers", bulk, 8, 256)])  # fmt: skip
    finally:
        echo.terminate()
        echo.join()

    await _protocols(args, version, single, bulk, results, report)

    floors = _floors(version, bulk, args.seconds, args.rounds)
    print(f"in-process floors for the 256-row Score, glibc's thresholds raised (its fast state), 1 intra-op thread, "
          f"alternating rounds, median of {args.rounds}")  # fmt: skip
    for label, r in floors.items():
        report(label, r)
    served = results["score 256 rows, 8 callers, batching on"]["rows_s"]
    fresh = await _fresh_servers(args, bulk)
    spread = max(fresh) / min(fresh) - 1
    results["256-row Score on fresh servers"] = fresh
    print(f"256-row Score, 8 callers, {len(fresh)} fresh servers: {', '.join(f'{r / 1000:.1f}k' for r in fresh)} rows/s "
          f"(spread {spread:.0%}: max / min - 1; target <= 10%)")  # fmt: skip

    for n, target in ((64, 0.8), (1, 0.7)):
        if f"ratio to echo, {n} callers" in results:
            callers_ = f"{n} caller{'s' if n > 1 else ''}"
            print(f"single-row Score at {callers_} / echo: {results[f'ratio to echo, {n} callers']:.2f}  (target >= {target}); "
                  f"the echo shaped like Score / echo: {results[f'ratio of shaped echo to echo, {n} callers']:.2f}, "
                  f"Score / the shaped echo: {results[f'ratio to shaped echo, {n} callers']:.2f}")  # fmt: skip
    for label in floors:
        print(f"256-row Score at 8 callers / {label}: {served / floors[label]['rows_s']:.2f}"
              + ("  (target >= 0.9)" if label == RAW_ENCODER_DECODER else ""))  # fmt: skip
    for key, target in [("OIP ModelInfer 1 row, 64 callers / Score", ">= 0.9"), ("OIP ModelInfer 256 rows, 8 callers / Score", ">= 0.9"),
                        ("ScoreStream 1 row, 8 streams / Score 1 row, 64 callers", ">= 1.5")]:  # fmt: skip
        print(f"{key}: {results[key]:.2f}  (target {target})")
    return results


STREAMS = 8
STREAM_WINDOW = 64  # messages each stream keeps in flight: the server's default stream_window


async def _protocols(args, version, single, bulk, results, report) -> None:
    """vaeserve.v1 Score, the Open Inference Protocol's ModelInfer and ScoreStream on one server, in
    alternating rounds: ModelInfer against Score for the same rows (1 row at 64 callers, 256 rows at 8),
    and STREAMS streams of single-row messages against unary single-row Score at 64 callers."""
    import asyncio

    import numpy as np

    from vaeserve.oip.v2 import predict_pb2 as oip
    from vaeserve.v1 import vaeserve_pb2_grpc as pb_grpc

    def infer_request(score):
        x = oip.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=score.x.shape)
        return oip.ModelInferRequest(model_name=version.name, inputs=[x], raw_input_contents=[score.x.data])

    server = start_server(args.repository, warmup_rows=64, max_batch_size=256,
                          **({} if args.max_queue_delay_ms is None else {"max_queue_delay_ms": args.max_queue_delay_ms}))  # fmt: skip
    try:
        await asyncio.to_thread(server.wait_serving)
        print(f"protocols on one server (batching on), alternating rounds, median of {args.rounds}: vaeserve.v1 Score, "
              f"OIP ModelInfer (raw_input_contents), ScoreStream ({STREAMS} streams, {STREAM_WINDOW} messages in flight each)")  # fmt: skip
        pid = server.process.pid
        async with _channels(server.target) as channels:
            stubs = [pb_grpc.InferenceStub(c) for c in channels]
            infers = [c.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                    request_serializer=oip.ModelInferRequest.SerializeToString,
                                    response_deserializer=oip.ModelInferResponse.FromString) for c in channels]  # fmt: skip

            def score(request):
                return [lambda stub=stub: stub.Score(request) for stub in stubs]

            def infer(request):
                return [lambda call=call: call(request) for call in infers]

            points = {
                "Score 1 row, 64 callers": lambda: _load(score(single), 64, args.seconds, 1, pid),
                "OIP ModelInfer 1 row, 64 callers": lambda: _load(infer(infer_request(single)), 64, args.seconds, 1, pid),
                f"ScoreStream 1 row, {STREAMS} streams": lambda: _stream_load(stubs, single, args.seconds, pid),
                "Score 256 rows, 8 callers": lambda: _load(score(bulk), 8, args.seconds, 256, pid),
                "OIP ModelInfer 256 rows, 8 callers": lambda: _load(infer(infer_request(bulk)), 8, args.seconds, 256, pid),
            }
            rounds = {point: [] for point in points}
            for i in range(args.rounds):  # every other round in reverse order: no point always follows another
                for point, measure in (list(points.items())[::-1] if i % 2 else points.items()):
                    rounds[point].append(await measure())
    finally:
        server.stop(60)
    for point, measured in rounds.items():
        report(point, _median_round(measured))
    for key, (a, b) in {
        "OIP ModelInfer 1 row, 64 callers / Score": ("OIP ModelInfer 1 row, 64 callers", "Score 1 row, 64 callers"),
        "OIP ModelInfer 256 rows, 8 callers / Score": ("OIP ModelInfer 256 rows, 8 callers", "Score 256 rows, 8 callers"),
        "ScoreStream 1 row, 8 streams / Score 1 row, 64 callers": (f"ScoreStream 1 row, {STREAMS} streams", "Score 1 row, 64 callers"),
    }.items():  # fmt: skip
        ratios = sorted(x["rows_s"] / y["rows_s"] for x, y in zip(rounds[a], rounds[b]))
        results[key] = float(np.median(ratios))
        print(f"  {key}: {results[key]:.2f} (rounds: {', '.join(f'{r:.2f}' for r in ratios)})")


async def _stream_load(stubs, request, seconds: float, server_pid: int | None = None) -> dict:
    """STREAMS ScoreStreams sending `request` over and over, each with STREAM_WINDOW messages in flight,
    for `seconds` after a short warm-up; latency is from a message's send to its reply. A message the server
    refuses (an error reply: more calls inside than its max_concurrent_rpcs, when STREAMS x STREAM_WINDOW
    exceeds it and the model is slow enough) is not a row scored: counted as "refused", not timed."""
    import asyncio
    import time
    from collections import Counter, deque

    refused: Counter[str] = Counter()

    async def stream(stub, state, latencies):
        slots, sent = asyncio.Semaphore(STREAM_WINDOW), deque()

        async def requests():
            while not state["stop"]:
                await slots.acquire()
                sent.append(time.perf_counter())
                yield request

        async for reply in stub.ScoreStream(requests()):
            start = sent.popleft()
            if reply.WhichOneof("result") != "score":
                if state["measure"]:
                    refused[reply.error.message.split(";")[0]] += 1
            elif state["measure"]:
                latencies.append(time.perf_counter() - start)
            slots.release()  # once stopped, the requests end when the last reply is in, and so does the stream

    result = await _measure(lambda state, latencies: [stream(stubs[i % len(stubs)], state, latencies) for i in range(STREAMS)],
                            seconds, server_pid=server_pid)  # fmt: skip
    result["refused"] = sum(refused.values())
    for message, count in refused.items():
        print(f"  ScoreStream: {count} messages refused: {message}")
    return result


def _median_round(rounds: list[dict]) -> dict:
    """The round with the median req/s (the upper one of an even count), whole, so its latencies go with it."""
    return sorted(rounds, key=lambda r: r["req_s"])[len(rounds) // 2]


FRESH_SERVERS = 5
RAW_ENCODER_DECODER = "raw ORT encoder + decoder"


async def _fresh_servers(args, bulk) -> list[float]:
    """256-row Score rows/s at 8 callers on FRESH_SERVERS servers, each started for its one measurement:
    a process that settles in a slow allocator state shows here."""
    import asyncio

    from vaeserve.v1 import vaeserve_pb2_grpc as pb_grpc

    measured = []
    for _ in range(FRESH_SERVERS):
        server = start_server(args.repository, warmup_rows=64, max_batch_size=256)
        try:
            await asyncio.to_thread(server.wait_serving)
            async with _channels(server.target) as channels:
                calls = [lambda stub=pb_grpc.InferenceStub(c): stub.Score(bulk) for c in channels]
                measured.append((await _load(calls, 8, args.seconds, 256))["rows_s"])
        finally:
            server.stop(60)
    return measured


def _floors(version, request, seconds: float, rounds: int) -> dict:
    """The 256-row Score's work in this process, without gRPC or the batcher, in alternating rounds (median
    round of each): RAW_ENCODER_DECODER, the model's own work (the encoder on the normalised rows, the decoder
    on elbo_samples posterior samples of each); the version's ONNX Runtime graphs as a Score runs them (the
    score graph, and the neighbour graph where the version has one); and its Scorer, raw rows in, scores out.
    glibc's thresholds are raised first, as the server does, so that the floors are in their fast state."""
    import numpy as np

    from vaeserve.artifact.runtime import Model
    from vaeserve.service import memory

    memory.configure_allocator()
    model = Model(version)
    scorer, m = model.scorer, version.manifest
    raw = np.frombuffer(request.x.data, "<f4").reshape(tuple(request.x.shape))
    rows = len(raw)
    x = scorer.prepare(raw)[0]
    y = np.eye(len(m.labels), dtype=np.float32)[np.zeros(rows, int)] if m.conditional else None
    mu = model.encoder.run({"x": x, "y": y})["mu"]
    z = np.repeat(mu, m.scoring.elbo_samples, axis=0)
    y_samples = None if y is None else np.repeat(y, m.scoring.elbo_samples, axis=0)
    neighbour_x = scorer.neighbour_input(raw)

    def graphs():
        if model.score_graph is None:  # a version without one scores on the NumPy path: its graphs are these
            encoder_decoder()
        else:
            model.score_graph.run({"x": x, "y": y})
        if model.neighbour_graph is not None:
            model.neighbour_graph.run({"x": neighbour_x})

    def encoder_decoder():
        model.encoder.run({"x": x, "y": y})
        model.decoder.run({"z": z, "y": y_samples})

    work = {RAW_ENCODER_DECODER: encoder_decoder, "raw ORT, the version's graphs": graphs,
            "the version's Scorer in-process": lambda: scorer.score(raw, y)}  # fmt: skip
    measured = {label: [] for label in work}
    for i in range(rounds):
        for label, one in (list(work.items())[::-1] if i % 2 else work.items()):
            measured[label].append(_time(one, rows, seconds))
    return {label: _median_round(r) for label, r in measured.items()}


def _time(one, rows: int, seconds: float) -> dict:
    """Call one() back to back for `seconds` (after one call to warm up)."""
    import time

    latencies = []
    one()
    end = time.perf_counter() + seconds
    start = time.perf_counter()
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        one()
        latencies.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - start
    return _summary(latencies, elapsed, rows)
