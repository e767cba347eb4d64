"""`vaeserve bench memory`: the server's memory under the largest requests its settings accept.

Serves a repository with the default settings (a `vaeserve serve` subprocess) and, per model, builds
the largest request of each RPC the defaults admit: max_rows rows, and for Score the most posterior
samples that fit max_request_values (label-free for a CVAE, with per-feature scores), for Embed the
most posterior samples. Phases, each followed by a pause long enough for the idle trim:
  1. idle: resident memory after warm-up;
  2. oversize: --burst messages of 200 MiB, which the receive limit must refuse (RESOURCE_EXHAUSTED);
  3. burst: --burst concurrent copies of each largest request, every RPC, every model;
  4. abandoned: the burst's Score requests again, their callers giving up after 0.3 s while the batches
     still compute (DEADLINE_EXCEEDED): the memory must come back all the same.
Reported: resident memory (VmRSS) idle before, peak (VmHWM) and idle after each phase, from /proc.
"""

import asyncio
import time

import numpy as np

MiB = 1 << 20


def largest_requests(manifest, settings) -> list[tuple[str, object]]:
    """(method, request) of the largest Score, Embed, Reconstruct, Generate and Decode the settings admit."""
    from vaeserve.v1 import vaeserve_pb2 as pb

    m, rows = manifest, settings.max_rows
    features, latent = m.input.features, m.model.latent_dim
    classes = len(m.labels) if m.labels else 1
    budget = settings.max_request_values
    rows = min(rows, budget // (m.scoring.elbo_samples * classes * features))
    iw = min(settings.max_iw_samples, budget // (rows * classes * features) - m.scoring.elbo_samples)
    posterior = min(settings.max_posterior_samples, budget // (rows * latent))
    rng = np.random.default_rng(0)
    x = (m.support.low + rng.random((rows, features)) * (m.support.high - m.support.low)).astype("<f4")
    z = rng.standard_normal((rows, latent)).astype("<f4")
    labels = [m.labels[i % classes] for i in range(rows)] if m.labels else []

    def tensor(a):
        return pb.Tensor(shape=a.shape, data=a.tobytes())

    return [
        ("Score", pb.ScoreRequest(model=m.name, x=tensor(x), iw_samples=iw, per_feature=True)),
        ("Embed", pb.EmbedRequest(model=m.name, x=tensor(x), labels=labels, posterior_samples=posterior, seed=0)),
        ("Reconstruct", pb.ReconstructRequest(model=m.name, x=tensor(x), labels=labels)),
        ("Generate", pb.GenerateRequest(model=m.name, count=0 if labels else rows, labels=labels, seed=0)),
        ("Decode", pb.DecodeRequest(model=m.name, z=tensor(z), labels=labels)),
    ]


async def _burst(target: str, requests: list[tuple[str, bytes]], copies: int, timeout: float = 600) -> dict:
    import collections

    import grpc

    codes: collections.Counter = collections.Counter()
    options = [("grpc.max_send_message_length", 1 << 30), ("grpc.max_receive_message_length", 1 << 30)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:

        async def call(method, data):
            stub = channel.unary_unary(f"/vaeserve.v1.Inference/{method}", request_serializer=None, response_deserializer=None)
            try:
                await stub(data, timeout=timeout)
                codes[method, "OK"] += 1
            except grpc.aio.AioRpcError as err:
                codes[method, err.code().name] += 1

        await asyncio.gather(*(call(method, data) for method, data in requests for _ in range(copies)))
    return codes


def _settle(server, pause: float, limit: float = 120.0) -> None:
    """Wait until the server has computed no batch for `pause` seconds (abandoned batches still run)."""
    def batches():
        return sum(v for (name, _), v in server.metrics().items() if name == "vaeserve_compute_seconds_count")

    end, seen, since = time.monotonic() + limit, batches(), time.monotonic()
    while time.monotonic() < end and time.monotonic() - since < pause:
        time.sleep(0.25)
        now = batches()
        if now != seen:
            seen, since = now, time.monotonic()


def run(args) -> int:
    from vaeserve.artifact.repository import scan_repository
    from vaeserve.benchmarks.harness import start_server
    from vaeserve.service.settings import Settings

    settings = Settings.load(repository=args.repository)  # the defaults, as the server will run them
    manifests = [max(v.items())[1].manifest for v in scan_repository(args.repository).values()]
    args.out.mkdir(parents=True, exist_ok=True)
    server = start_server(args.repository, log=args.out / "serve.log")
    ok = True
    try:
        server.wait_serving()
        time.sleep(args.pause)
        idle = server.memory()["VmRSS"]
        print(f"idle after warm-up: {idle / MiB:.0f} MiB ({len(manifests)} models: {', '.join(m.name for m in manifests)})")
        largest = [(method, request.SerializeToString()) for m in manifests for method, request in largest_requests(m, settings)]
        for m in manifests:
            for method, request in largest_requests(m, settings):
                print(f"  largest {method} to {m.name}: {request.ByteSize() / MiB:.1f} MiB")
        from vaeserve.v1 import vaeserve_pb2 as pb

        big = pb.ScoreRequest(model=manifests[0].name, x=pb.Tensor(shape=[1, manifests[0].input.features], data=bytes(200 * MiB)))
        oversize = [("Score", big.SerializeToString())]
        abandoned = [(method, data) for method, data in largest if method == "Score"]
        phases = [("oversize", oversize, 600, "RESOURCE_EXHAUSTED"), ("burst", largest, 600, "OK"),
                  ("abandoned", abandoned, 0.3, "DEADLINE_EXCEEDED RESOURCE_EXHAUSTED")]  # VmHWM only grows: smaller peak first
        for phase, requests, timeout, want in phases:
            started = time.monotonic()
            codes = asyncio.run(_burst(server.target, requests, args.burst, timeout))
            seconds = time.monotonic() - started
            peak = server.memory()["VmHWM"]
            _settle(server, args.pause)
            after = server.memory()["VmRSS"]
            print(f"{phase}: {args.burst} concurrent copies of {len(requests)} requests in {seconds:.1f} s: "
                  f"{', '.join(f'{m} {c} {n}' for (m, c), n in sorted(codes.items()))}")  # fmt: skip
            print(f"  peak RSS {peak / MiB:.0f} MiB; {args.pause:g} s after the last batch {after / MiB:.0f} MiB "
                  f"({after / idle:.2f}x the idle before the burst)")  # fmt: skip
            # Abandoned: expired in the queue, or refused at once as the queue would not reach them in time.
            ok &= all(code in want.split() for _, code in codes) and peak < 2048 * MiB and after < 2 * idle
    finally:
        server.stop()
    print("peak under 2 GiB, idle within 2x, every answer as expected" if ok else "FAILED: see above")
    return 0 if ok else 1
