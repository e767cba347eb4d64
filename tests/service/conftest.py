"""A real server on loopback, as a subprocess of `vaeserve serve`, over the exported test repository."""

import asyncio

import pytest

from vaeserve.benchmarks import harness

LIMITS = {"max_rows": 1000, "max_iw_samples": 256}  # the session server's


@pytest.fixture(scope="session")
def server(model_repository):
    """One server for the read-only tests: a short queue delay so concurrent requests batch."""
    running = harness.start_server(model_repository, max_queue_delay_ms=5, **LIMITS)
    try:
        running.wait_serving()
        yield running
    finally:
        running.stop()


@pytest.fixture
def start_server():
    """Start another server subprocess: start_server(repository, **settings) -> ServerProcess."""
    return harness.start_server


@pytest.fixture(scope="session")
def limits():
    return LIMITS


@pytest.fixture(scope="session")
def client(server):
    from vaeserve.service.client import Client

    with Client(server.target) as c:
        yield c


@pytest.fixture(scope="session")
def rows(digits):
    """Raw held-out digits rows (features 0..16)."""
    data, _, val, *_ = digits
    return data.x[val][:32].astype("float32"), [data.label_names[i] for i in data.y[val][:32]]


@pytest.fixture(scope="session")
def wait_admitted():
    """await wait_admitted(server, model, count): until `count` Score requests of `model`, each a batch of its
    own, are pending or answered (a scrape may land after the first batch is done); fails after 1000 scrapes."""

    async def wait(server, model: str, count: int) -> None:
        labels = (("graph", "score"), ("model", model))
        for _ in range(1000):
            metrics = await asyncio.to_thread(server.metrics)
            if metrics.get(("vaeserve_pending_requests", labels), 0) + metrics.get(("vaeserve_compute_seconds_count", labels), 0) >= count:
                return
            await asyncio.sleep(0.02)
        pytest.fail(f"{count} Score requests of {model} never all admitted")

    return wait
