"""`vaeserve bench overload`: an open-loop load above capacity (not a test).

First the capacity: --callers closed-loop callers sending Score of --rows rows back to back. Then calls
sent at --factor times that rate for --seconds, each with a --deadline, whatever the server answers
(open loop: a slow server is not given a rest, as callers in production do not give one), at most
--max-outstanding at once. Then the capacity again (recovery). Reports every call's status code, the
OK rate against capacity, the server's RSS over the run and its rejection counters. A healthy server
answers every call once, the excess RESOURCE_EXHAUSTED at once, almost nothing CANCELLED, keeps its OK
rate near capacity and its memory flat, and is back at capacity afterwards.
"""

import asyncio
import collections
import time

from vaeserve.benchmarks.harness import cpu_seconds, model_version, run_scenario

CAPACITY_SECONDS = 5.0


def run(args) -> int:
    import json

    version = model_version(args.repository, args.model)
    result, code = run_scenario(args.repository, args.out, lambda server: _overload(args, server, version),
                                max_batch_size=args.max_batch_size)  # fmt: skip
    result["exit_code"] = code
    _report(result)
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


def _request(version, rows: int):
    import numpy as np

    from vaeserve.service.client import to_tensor
    from vaeserve.v1 import vaeserve_pb2 as pb

    m = version.manifest
    rng = np.random.default_rng(0)
    x = rng.uniform(m.support.low, m.support.high, (rows, m.input.features)).astype(np.float32)
    return pb.ScoreRequest(model=m.name, x=to_tensor(x))


async def _capacity(stub, request, callers: int, seconds: float) -> float:
    """OK calls per second of `callers` closed-loop callers."""
    ok, stop = 0, time.perf_counter() + seconds

    async def caller():
        nonlocal ok
        while time.perf_counter() < stop:
            await stub.Score(request, timeout=10)
            ok += 1

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    return ok / (time.perf_counter() - start)


async def _overload(args, server, version) -> dict:
    import grpc
    import numpy as np

    from vaeserve.v1 import vaeserve_pb2_grpc as pb_grpc

    request = _request(version, args.rows)
    async with grpc.aio.insecure_channel(server.target, options=[("grpc.max_send_message_length", 1 << 28)]) as channel:
        stub = pb_grpc.InferenceStub(channel)
        await _capacity(stub, request, args.callers, 1.0)  # warm-up
        cpu = _cpu(server)
        capacity = await _capacity(stub, request, args.callers, CAPACITY_SECONDS)
        cpu_capacity = _per_second(cpu, _cpu(server), CAPACITY_SECONDS)
        rss_before = server.memory()["VmRSS"]
        rate = args.factor * capacity
        codes: collections.Counter = collections.Counter()
        latency = collections.defaultdict(list)
        outstanding, skipped, rss = 0, 0, [rss_before]

        async def call():
            nonlocal outstanding
            start = time.perf_counter()
            try:
                await stub.Score(request, timeout=args.deadline)
                code = "OK"
            except grpc.aio.AioRpcError as err:
                code = err.code().name
            codes[code] += 1
            latency[code].append(time.perf_counter() - start)
            outstanding -= 1

        tasks = set()
        batches = _batches(server, version.name)
        cpu = _cpu(server)
        start = time.perf_counter()
        sent, next_rss = 0, start + 1.0
        while (now := time.perf_counter()) < start + args.seconds:
            due = int((now - start) * rate) + 1
            while sent < due:
                sent += 1
                if outstanding >= args.max_outstanding:
                    skipped += 1
                    continue
                outstanding += 1
                task = asyncio.ensure_future(call())
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if now >= next_rss:
                rss.append(server.memory()["VmRSS"])
                next_rss += 1.0
            await asyncio.sleep(0.001)
        elapsed = time.perf_counter() - start
        cpu_overload = _per_second(cpu, _cpu(server), elapsed)
        batches = {k: v - batches[k] for k, v in _batches(server, version.name).items()}
        await asyncio.gather(*tasks)
        rss.append(server.memory()["VmRSS"])
        await asyncio.sleep(1.0)
        recovered = await _capacity(stub, request, args.callers, CAPACITY_SECONDS)
    metrics = server.metrics()
    rejected = {dict(labels)["reason"]: value for (name, labels), value in metrics.items() if name == "vaeserve_rejected_total"}
    answered = sum(codes.values())
    p = {code: {q: float(np.percentile(v, q) * 1000) for q in (50, 99)} for code, v in latency.items()}
    return {
        "model": version.name, "rows": args.rows, "deadline_s": args.deadline, "capacity_req_s": capacity,
        "offered_req_s": (sent - skipped) / elapsed, "target_req_s": rate, "skipped": skipped, "answered": answered,
        "codes": dict(codes), "ok_req_s": codes["OK"] / elapsed, "latency_ms": p,
        "cancelled_fraction": codes["CANCELLED"] / max(answered, 1),
        "rss_mib": [r / 2**20 for r in rss], "rss_growth": max(rss) / rss_before - 1,
        "recovered_req_s": recovered, "server_rejected": rejected,
        "cores_used": {"capacity": cpu_capacity, "overload": cpu_overload},
        "score_batches": {"batches": batches["count"], "mean_rows": batches["rows"] / max(batches["count"], 1),
                          "mean_compute_ms": 1000 * batches["seconds"] / max(batches["count"], 1),
                          "compute_busy": batches["seconds"] / elapsed},
    }  # fmt: skip


def _batches(server, model: str) -> dict:
    """The model's Score batches so far: how many, their rows and compute seconds, from the server's metrics."""
    wanted = {("graph", "score"), ("model", model)}
    m = {name: value for (name, labels), value in server.metrics().items() if wanted <= set(labels)}
    return {"count": m.get("vaeserve_batch_rows_count", 0.0), "rows": m.get("vaeserve_batch_rows_sum", 0.0),
            "seconds": m.get("vaeserve_compute_seconds_sum", 0.0)}  # fmt: skip


def _cpu(server) -> dict:
    """CPU seconds so far of the server process and of this one (the load generator)."""
    return {"server": cpu_seconds(server.process.pid)[1], "generator": time.process_time()}


def _per_second(before: dict, after: dict, seconds: float) -> dict:
    """Cores used in each process between two readings of _cpu."""
    return {k: round((after[k] - before[k]) / seconds, 2) for k in before}


def _report(r: dict) -> None:
    print(f"model {r['model']}, Score of {r['rows']} rows, deadline {r['deadline_s']} s")
    print(f"capacity (closed loop): {r['capacity_req_s']:.0f} req/s")
    print(f"offered: {r['offered_req_s']:.0f} req/s (target {r['target_req_s']:.0f}; {r['skipped']} not sent, "
          f"max outstanding reached)")  # fmt: skip
    print(f"answered {r['answered']}: " + ", ".join(f"{c} {n}" for c, n in sorted(r["codes"].items())))
    for code, q in sorted(r["latency_ms"].items()):
        print(f"  {code}: p50 {q[50]:.1f} ms, p99 {q[99]:.1f} ms")
    baseline = (r["capacity_req_s"] + r["recovered_req_s"]) / 2
    print(f"OK: {r['ok_req_s']:.0f} req/s = {r['ok_req_s'] / r['capacity_req_s']:.2f}x capacity before, "
          f"{r['ok_req_s'] / baseline:.2f}x the mean of before and after; "
          f"CANCELLED {100 * r['cancelled_fraction']:.2f}%")  # fmt: skip
    print(f"RSS: {r['rss_mib'][0]:.0f} MiB before, max {max(r['rss_mib']):.0f}, growth {100 * r['rss_growth']:.1f}%")
    print(f"after: {r['recovered_req_s']:.0f} req/s = {r['recovered_req_s'] / r['capacity_req_s']:.2f}x capacity")
    print(f"cores used: {r['cores_used']}")
    b = r["score_batches"]
    print(f"Score batches during the overload: {b['batches']:.0f}, {b['mean_rows']:.0f} rows and "
          f"{b['mean_compute_ms']:.1f} ms each, computing {100 * b['compute_busy']:.0f}% of the time")
    print(f"server vaeserve_rejected_total: {r['server_rejected']}; exit code {r['exit_code']}")
