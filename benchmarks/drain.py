"""`vaeserve bench drain`: SIGTERM while --callers callers send single-row Score back to back (not a test).

Each caller keeps calling until it is answered UNAVAILABLE (the server has stopped accepting: a caller
behind a balancer moves to another replica) or --seconds have passed; a health Watch runs beside them.
Reports the status codes of the calls sent before the signal, during the notice (drain_notice_seconds,
health NOT_SERVING while calls are still served) and after it, when NOT_SERVING was seen, and the exit
code. A clean drain fails none of the calls sent before UNAVAILABLE began and exits 0.
"""

import asyncio
import collections
import signal
import time

from vaeserve.benchmarks.harness import model_version, run_scenario


def run(args) -> int:
    import json

    version = model_version(args.repository, args.model)
    result, _ = run_scenario(args.repository, args.out,
                             lambda server: sigterm_under_load(server, version.manifest, args.callers, args.before, args.seconds),
                             drain_notice_seconds=args.notice)  # fmt: skip
    _report(result)
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


async def sigterm_under_load(server, manifest, callers: int, before: float = 1.0, seconds: float = 30.0) -> dict:
    """Run the scenario against a started server; its results as a dict (the tests assert on them)."""
    import grpc
    import numpy as np
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from vaeserve.service.client import to_tensor
    from vaeserve.v1 import vaeserve_pb2 as pb
    from vaeserve.v1 import vaeserve_pb2_grpc as pb_grpc

    x = np.asarray([(manifest.support.low + manifest.support.high) / 2], np.float32)
    request = pb.ScoreRequest(model=manifest.name, x=to_tensor(x))
    phases = collections.defaultdict(collections.Counter)  # phase the call was sent in -> status code -> calls
    messages: dict[str, str] = {}
    state = {"signal": None, "not_serving": None, "unavailable": None}
    end = time.monotonic() + seconds

    def phase(sent: float) -> str:
        if state["signal"] is None or sent < state["signal"]:
            return "before"
        return "notice" if state["unavailable"] is None or sent < state["unavailable"] else "after"

    async def caller(stub):
        while time.monotonic() < end:
            sent = time.monotonic()
            try:
                await stub.Score(request, timeout=10)
                code = "OK"
            except grpc.aio.AioRpcError as err:
                code = err.code().name
                messages.setdefault(code, err.details())
            phases[phase(sent)][code] += 1
            if code == "UNAVAILABLE":
                state["unavailable"] = state["unavailable"] or time.monotonic()
                return

    async def watch(channel):
        stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        with_status = health_pb2.HealthCheckResponse
        try:
            async for reply in stream:
                if reply.status == with_status.NOT_SERVING and state["signal"] is not None:
                    state["not_serving"] = time.monotonic()
                    return
        except grpc.aio.AioRpcError:
            return

    channels = [grpc.aio.insecure_channel(server.target, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(4)]
    try:
        stubs = [pb_grpc.InferenceStub(c) for c in channels]
        watcher = asyncio.ensure_future(watch(channels[0]))
        tasks = [asyncio.ensure_future(caller(stubs[i % len(stubs)])) for i in range(callers)]
        await asyncio.sleep(before)
        state["signal"] = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        await asyncio.gather(*tasks)
        await asyncio.wait_for(watcher, 5)
        exit_code = await asyncio.to_thread(server.process.wait, 30)
        exited = time.monotonic()
    finally:
        for channel in channels:
            await channel.close()
    since = lambda t: None if t is None else round(t - state["signal"], 3)  # noqa: E731
    return {
        "callers": callers, "calls": {p: dict(c) for p, c in phases.items()}, "messages": messages,
        "not_serving_after_s": since(state["not_serving"]), "unavailable_after_s": since(state["unavailable"]),
        "exit_code": exit_code, "exited_after_s": since(exited),
    }  # fmt: skip


def _report(r: dict) -> None:
    print(f"{r['callers']} callers; SIGTERM; health NOT_SERVING seen after {r['not_serving_after_s']} s; "
          f"first UNAVAILABLE after {r['unavailable_after_s']} s; exit {r['exit_code']} after {r['exited_after_s']} s")  # fmt: skip
    for phase in ("before", "notice", "after"):
        calls = r["calls"].get(phase, {})
        print(f"  calls sent {phase:>6}: " + (", ".join(f"{c} {n}" for c, n in sorted(calls.items())) or "none"))
    for code, message in r["messages"].items():
        print(f"  {code}: {message}")
