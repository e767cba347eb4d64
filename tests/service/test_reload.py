"""New model versions without a restart, against real servers on loopback over a repository of real files:
versions added, replaced, removed and broken while the server runs, on a short poll and on SIGHUP."""

import asyncio
import dataclasses
import gc
import shutil
import signal
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from vaeserve.artifact.manifest import read_manifest
from vaeserve.benchmarks.reload import copy_version
from vaeserve.conformal import Calibration
from vaeserve.service.client import Client, to_tensor
from vaeserve.v1 import vaeserve_pb2 as pb
from vaeserve.v1 import vaeserve_pb2_grpc as pb_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
POLL = 0.2  # seconds between rescans in these tests
NOTICED = POLL + 2.0  # how soon a change must be served


def replace_version(source, root, model: str, version: int, **changes) -> None:
    """A version folder replaced whole by another, as an operator would: the old one moved aside and removed."""
    old = root / model / str(version)
    old.rename(root / model / f".old-{version}")
    copy_version(source, root, model, version, **changes)
    shutil.rmtree(root / model / f".old-{version}")


def alter_graph(folder) -> None:
    """Bytes of the decoder changed behind the manifest's back (its sha256 no longer matches)."""
    path = folder / "decoder.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate_manifest(folder) -> None:
    (folder / "manifest.json").write_text('{"schema_version": 2, "name": "vae"')


@pytest.fixture
def repository(model_repository, tmp_path):
    """vae/1 and cvae/1, copied from the session repository, to change at will."""
    root = tmp_path / "models"
    for name in ("vae", "cvae"):
        shutil.copytree(model_repository / name / "1", root / name / "1")
    return root


@pytest.fixture
def serve(start_server, tmp_path):
    """serve(root, **settings): a started, SERVING server with its log kept; stopped (exit 0) afterwards."""
    servers = []

    def start(root, **settings):
        server = start_server(root, log=tmp_path / f"serve-{len(servers)}.log", **{"repository_poll_seconds": POLL, **settings})
        servers.append(server)
        server.wait_serving()
        return server

    yield start
    for server in servers:
        assert server.stop() == 0, server.log_text()


def wait_for(condition, timeout: float, what: str):
    """Poll `condition` (a callable) every 20 ms until it returns something true; that value, and the seconds taken."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        value = condition()
        if value:
            return value, time.monotonic() - start
        time.sleep(0.02)
    pytest.fail(f"not after {timeout} s: {what}")


def loads(server, model: str, result: str) -> float:
    return server.metrics().get(("vaeserve_model_loads_total", (("model", model), ("result", result))), 0.0)


def model_info_versions(server, model: str) -> set[str]:
    return {dict(labels)["version"] for (name, labels), value in server.metrics().items()
            if name == "vaeserve_model_info" and dict(labels)["model"] == model and value == 1}  # fmt: skip


def score(target, model: str, x, version: int = 0, **options) -> pb.ScoreResponse:
    request = pb.ScoreRequest(model=model, version=version, x=to_tensor(x), **options)
    with grpc.insecure_channel(target) as channel:
        return pb_grpc.InferenceStub(channel).Score(request, timeout=30)


class HealthWatch:
    """Every health status seen while the block runs, polled every 20 ms from a thread."""

    def __init__(self, server):
        self.server, self.seen, self._done = server, [], threading.Event()

    def __enter__(self):
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._done.is_set():
            self.seen.append(self.server.health())
            time.sleep(0.02)

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join(5)


def test_new_version_is_served_within_the_poll_interval(repository, model_repository, serve, rows):
    x, _ = rows
    server = serve(repository)
    with Client(server.target) as client, HealthWatch(server) as health:
        assert client.models() == {"cvae": [1], "vae": [1]}
        before = score(server.target, "vae", x)
        assert before.version == 1
        time.sleep(2 * POLL)  # a few rescans of an unchanged repository: nothing is loaded again
        assert loads(server, "vae", "loaded") == 1

        copy_version(model_repository / "vae" / "1", repository, "vae", 2)
        _, seconds = wait_for(lambda: client.models()["vae"] == [1, 2], NOTICED, "vae version 2 in ListModels")
        assert seconds < NOTICED
        assert client.get_model("vae").version == 2 and client.get_model("vae", version=1).version == 1
        newest = score(server.target, "vae", x)
        assert newest.version == 2
        np.testing.assert_allclose(newest.neg_elbo, before.neg_elbo, rtol=1e-6)  # the same graphs, copied
        assert score(server.target, "vae", x, version=1).version == 1
        assert loads(server, "vae", "loaded") == 2 and loads(server, "vae", "failed") == 0
        assert model_info_versions(server, "vae") == {"1", "2"}

        # Version 2 replaced by one calibrated for another target (the conformal threshold of a 5% rate): its
        # fingerprint changed, so it is read again.
        vae_1 = model_repository / "vae" / "1"
        calibrated = read_manifest(vae_1).thresholds
        calibration = Calibration.of(np.asarray(calibrated.calibration_scores))
        target = dataclasses.replace(calibrated, target_false_positive_rate=0.05, default=calibration.threshold(0.05),
                                     promised_false_positive_rate=calibration.rate(0.05))  # fmt: skip
        assert target.default < calibrated.default
        replace_version(vae_1, repository, "vae", 2, thresholds=target)
        wait_for(lambda: client.get_model("vae").threshold == target.default, NOTICED, "vae version 2 replaced")
        replaced = score(server.target, "vae", x)
        assert (replaced.version, replaced.threshold) == (2, target.default)
        assert score(server.target, "vae", x, version=1).threshold == before.threshold
        assert loads(server, "vae", "loaded") == 3
        assert model_info_versions(server, "vae") == {"1", "2"}
        time.sleep(2 * POLL)
    assert len(health.seen) > 10 and set(health.seen) == {SERVING}, health.seen
    assert "loaded vae version 2" in server.log_text()


def test_sighup_rescans_with_polling_off(repository, model_repository, serve):
    server = serve(repository, repository_poll_seconds=0)
    with Client(server.target) as client:
        copy_version(model_repository / "vae" / "1", repository, "vae", 2)
        time.sleep(1.0)
        assert client.models()["vae"] == [1]  # no polling: nothing happens on its own
        server.process.send_signal(signal.SIGHUP)
        wait_for(lambda: client.models()["vae"] == [1, 2], 5, "vae version 2 after SIGHUP")
        shutil.rmtree(repository / "vae" / "1")
        for _ in range(3):  # signals in a burst: rescans one at a time, none overlapping, the process alive
            server.process.send_signal(signal.SIGHUP)
        wait_for(lambda: client.models()["vae"] == [2], 5, "vae version 1 gone after SIGHUP")
        time.sleep(0.5)
        assert server.process.poll() is None
        assert server.health() == SERVING
        assert client.score("vae", np.zeros((1, 64), np.float32)).neg_elbo.shape == (1,)
    assert loads(server, "vae", "loaded") == 2


def test_removed_and_broken_versions(repository, model_repository, serve, rows):
    x, labels = rows
    vae_1, cvae_1 = model_repository / "vae" / "1", model_repository / "cvae" / "1"
    copy_version(vae_1, repository, "vae", 2)
    server = serve(repository)
    with Client(server.target) as client, HealthWatch(server) as health:
        assert client.models() == {"cvae": [1], "vae": [1, 2]}
        first = score(server.target, "vae", x, version=1)

        shutil.rmtree(repository / "vae" / "2")
        wait_for(lambda: client.models()["vae"] == [1], NOTICED, "vae version 2 gone")
        with pytest.raises(grpc.RpcError) as failure:
            client.score("vae", x, version=2)
        assert failure.value.code() == grpc.StatusCode.NOT_FOUND
        assert score(server.target, "vae", x).version == 1
        wait_for(lambda: model_info_versions(server, "vae") == {"1"}, 5, "version 2's model_info gone")

        # Broken versions: graph bytes altered, a manifest that is not JSON, and one needing larger gRPC
        # messages than the server started with (a 1000-character label). None changes what is served.
        copy_version(vae_1, repository, "vae", 3, damage=alter_graph)
        copy_version(vae_1, repository, "vae", 4, damage=truncate_manifest)
        long_label = ("x" * 1000, *read_manifest(cvae_1).labels[1:])
        copy_version(cvae_1, repository, "cvae", 2, labels=long_label)
        wait_for(lambda: loads(server, "vae", "failed") == 2 and loads(server, "cvae", "failed") == 1, NOTICED,
                 "three failed loads")  # fmt: skip
        time.sleep(5 * POLL)  # more rescans of an unchanged repository
        assert client.models() == {"cvae": [1], "vae": [1]}
        np.testing.assert_array_equal(score(server.target, "vae", x).neg_elbo, first.neg_elbo)

        # Version 3 replaced by a good one: its folder changed, so it is tried again, and served; the
        # rescans this change brings about do not try vae/4 or cvae/2 again.
        replace_version(vae_1, repository, "vae", 3)
        wait_for(lambda: client.models()["vae"] == [1, 3], NOTICED, "vae version 3 repaired")
        assert score(server.target, "vae", x).version == 3
        time.sleep(5 * POLL)
        assert loads(server, "vae", "failed") == 2 and loads(server, "cvae", "failed") == 1
        log = server.log_text()
        lines = {version: [line for line in log.splitlines() if f"skipping {repository / 'vae' / str(version)}: " in line]
                 for version in (3, 4)}  # fmt: skip
        assert len(lines[3]) == 1 and "decoder.onnx: sha256" in lines[3][0] and "the graph was altered" in lines[3][0], log
        assert len(lines[4]) == 1 and "manifest.json: corrupt JSON" in lines[4][0], log
        (refused,) = [line for line in log.splitlines() if f"skipping {repository / 'cvae' / '2'}: " in line]
        assert "needs gRPC message limits" in refused and "restart the server to serve it" in refused, refused

        # Every version of a model gone: the model is no longer served.
        shutil.rmtree(repository / "cvae")
        wait_for(lambda: "cvae" not in client.models(), NOTICED, "cvae gone")
        with pytest.raises(grpc.RpcError) as failure:
            client.score("cvae", x, labels)
        assert failure.value.code() == grpc.StatusCode.NOT_FOUND
    assert set(health.seen) == {SERVING}, health.seen
    assert loads(server, "vae", "loaded") == 3 and loads(server, "cvae", "loaded") == 1
    assert "WARNING" in next(line for line in server.log_text().splitlines() if "model 'cvae' is no longer served" in line)


def test_max_versions_serves_the_newest_that_load(repository, model_repository, serve):
    vae_1 = model_repository / "vae" / "1"
    copy_version(vae_1, repository, "vae", 2)
    copy_version(vae_1, repository, "vae", 3, damage=alter_graph)
    server = serve(repository, max_versions=1)
    with Client(server.target) as client:
        assert client.models() == {"cvae": [1], "vae": [2]}  # 3 fails, 2 loads; 1 is not even read
        assert (loads(server, "vae", "loaded"), loads(server, "vae", "failed")) == (1, 1)
        copy_version(vae_1, repository, "vae", 4)
        wait_for(lambda: client.models()["vae"] == [4], NOTICED, "vae version 4 alone")
        assert model_info_versions(server, "vae") == {"4"}
        shutil.rmtree(repository / "vae" / "4")
        wait_for(lambda: client.models()["vae"] == [2], NOTICED, "back to vae version 2")
        assert client.get_model("vae").version == 2
    assert (loads(server, "vae", "loaded"), loads(server, "vae", "failed")) == (3, 1)


def test_in_flight_requests_on_a_removed_version_finish(repository, model_repository, serve, wait_admitted):
    copy_version(model_repository / "vae" / "1", repository, "vae", 2)
    server = serve(repository, max_batch_size=256)
    in_flight = 6
    # Each Score of 256 rows with K = 512 runs as a batch of its own, of about 0.2 s on a 2-core box.
    x = np.ones((256, 64), np.float32)

    async def scenario():
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = pb_grpc.InferenceStub(channel)
            requests = [pb.ScoreRequest(model="vae", version=2, x=to_tensor(x + i), iw_samples=512) for i in range(in_flight)]
            calls = [asyncio.ensure_future(stub.Score(request, timeout=60)) for request in requests]
            await wait_admitted(server, "vae", in_flight)
            shutil.rmtree(repository / "vae" / "2")
            with Client(server.target) as client:
                for _ in range(int(NOTICED / 0.02)):
                    if (await asyncio.to_thread(client.models))["vae"] == [1]:
                        break
                    await asyncio.sleep(0.02)
                else:
                    pytest.fail("vae version 2 still served")
            still_running = sum(not call.done() for call in calls)
            return still_running, await asyncio.gather(*calls)

    still_running, results = asyncio.run(scenario())
    assert still_running > 0  # the version left while they were inside it
    assert len(results) == in_flight
    assert all(r.version == 2 and len(r.neg_elbo) == 256 and np.isfinite(r.neg_iw).all() for r in results)
    wait_for(lambda: "unloaded vae version 2" in server.log_text(), 10, "version 2 closed once its requests finished")
    log = server.log_text()
    assert log.index("unloading vae version 2") < log.index("unloaded vae version 2")
    assert "Traceback" not in log, log


def test_a_retired_version_lets_go_of_its_sessions(repository, model_repository):
    """In-process, with the garbage collector off: once the last request holding a version that left is done,
    nothing refers to its ONNX Runtime sessions any more."""
    from vaeserve.service.models import ModelRegistry, open_models
    from vaeserve.service.settings import Settings

    copy_version(model_repository / "vae" / "1", repository, "vae", 2)
    settings = Settings.load(environ={}, repository=repository)
    opened = open_models(settings)
    registry = ModelRegistry(settings, ThreadPoolExecutor(1), opened.state)

    async def scenario():
        registry.serve(registry.warm_up(opened))
        opened.clear()
        version_2 = registry.get("vae")
        sessions = weakref.ref(version_2.artifact.encoder.session), weakref.ref(version_2.artifact.decoder.session)
        with version_2.in_use():
            shutil.rmtree(repository / "vae" / "2")
            (leaving,) = registry.serve(await asyncio.to_thread(registry.rescan))
            assert leaving is version_2 and registry.get("vae").version == 1
            retiring = asyncio.ensure_future(leaving.retire())
            await asyncio.sleep(0.05)
            assert not retiring.done()  # waits for the request inside
            assert (await version_2.score(np.zeros((1, 64), np.float32), [], None, 0)).scores.neg_elbo.shape == (1,)
        del leaving, version_2
        await asyncio.wait_for(retiring, 5)
        return sessions

    gc.disable()
    try:
        sessions = asyncio.run(scenario())
        assert [ref() for ref in sessions] == [None, None]
    finally:
        gc.enable()
    assert registry.rescan() is None  # nothing changed since: nothing read
