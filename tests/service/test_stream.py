"""ScoreStream against a real server: answers in order and equal to unary Score, one error per bad
message with the stream going on, per-message metrics, the stream window, cancellation freeing queued
work, the drain, and the client helpers."""

import asyncio
import signal
import threading
import time

import grpc
import numpy as np
import pytest

from vaeserve.service.client import AsyncClient, Client, StreamError
from vaeserve.service.client import to_tensor as tensor
from vaeserve.service.status import DRAINING_MESSAGE
from vaeserve.v1 import vaeserve_pb2 as pb
from vaeserve.v1 import vaeserve_pb2_grpc as pb_grpc

SCORE_STREAM = "/vaeserve.v1.Inference/ScoreStream"
INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
# A row's scores do not depend on the rows sharing its batch (the posterior noise is shared): bit-identical
# here; the tolerance leaves room for kernels that round differently at another batch size.
TOLERANCE = dict(rtol=1e-6, atol=1e-6)
PENDING = ("vaeserve_pending_requests", (("graph", "score"), ("model", "vae")))
BATCHES, BATCHED_ROWS = (("vaeserve_batch_rows_count", (("graph", "score"), ("model", "vae"))),
                         ("vaeserve_batch_rows_sum", (("graph", "score"), ("model", "vae"))))  # fmt: skip


def assert_same_scores(got: list, expected) -> None:
    """Stream answers (ScoreResults), concatenated, against one unary ScoreResult for all their rows."""
    assert not [g for g in got if isinstance(g, StreamError)]
    for field in ("neg_elbo", "reconstruction", "kl", "neg_iw", "per_feature", "anomaly_score", "p_value", "knn_distance"):
        parts = [getattr(g, field) for g in got]
        if getattr(expected, field) is None:
            assert all(p is None for p in parts), field
        else:
            np.testing.assert_allclose(np.concatenate(parts), getattr(expected, field), **TOLERANCE, err_msg=field)
    for field in ("is_anomaly", "out_of_support"):
        np.testing.assert_array_equal(np.concatenate([getattr(g, field) for g in got]), getattr(expected, field))
    assert {g.threshold for g in got} == {expected.threshold}


def stream_counts(metrics: dict, before: dict) -> dict:
    """{(model, code): ScoreStream messages counted since `before`} (nonzero ones)."""
    counts = {}
    for (name, labels), value in metrics.items():
        labels = dict(labels)
        if name == "vaeserve_requests_total" and labels["method"] == "ScoreStream":
            counted = value - before.get((name, tuple(sorted(labels.items()))), 0.0)
            if counted:
                counts[labels["model"], labels["code"]] = counted
    return counts


@pytest.fixture(scope="module")
def feed(digits):
    """1000 raw digits rows and their label names."""
    data, _, _, *_ = digits
    return data.x[:1000].astype(np.float32), [data.label_names[i] for i in data.y[:1000]]


def test_a_thousand_single_rows_on_one_stream(server, client, feed):
    x, _ = feed
    before = server.metrics()
    answers = list(client.score_stream("vae", x))  # each row a message of its own
    after = server.metrics()
    assert len(answers) == 1000
    assert_same_scores(answers, client.score("vae", x))  # in order: every row scores differently
    assert stream_counts(after, before) == {("vae", "OK"): 1000}
    assert after[BATCHED_ROWS] - before.get(BATCHED_ROWS, 0) == 1000  # through the model's Score batcher


def test_a_bad_message_gets_its_own_error_and_the_stream_goes_on(server, client, feed):
    x, labels = feed
    nan = x[:2].copy()
    nan[1, 5] = np.nan

    def message(model="vae", rows=x[:1], labels=()):
        return pb.ScoreRequest(model=model, x=tensor(rows), labels=labels).SerializeToString()

    sent = [  # (bytes, the error expected or None, the rows a good message scores)
        (message(rows=x[0:2]), None, x[0:2]),
        (message(rows=nan), (INVALID, "x: NaN or Inf at row 1, column 5"), None),
        (message(rows=x[2:3]), None, x[2:3]),
        (message(rows=np.ones((1, 10))), (INVALID, "takes 64 values per row, got 10"), None),
        (message(rows=x[3:6]), None, x[3:6]),
        (message(model="nope"), (NOT_FOUND, "no model 'nope'"), None),
        (message(rows=x[6:7]), None, x[6:7]),
        (b"\xff\xff\xff", (INVALID, "the request is not a valid vaeserve.v1.ScoreRequest message"), None),  # does not decode
        (message(model="cvae", rows=x[7:9], labels=labels[7:9]), None, x[7:9]),
        (message(rows=x[9:10]), None, x[9:10]),
    ]
    before = server.metrics()
    with grpc.insecure_channel(server.target) as channel:
        call = channel.stream_stream(SCORE_STREAM, request_serializer=None,
                                     response_deserializer=pb.ScoreStreamResponse.FromString)  # fmt: skip
        replies = list(call(iter([data for data, _, _ in sent]), timeout=30))
    assert len(replies) == len(sent)
    for i, (reply, (data, error, rows)) in enumerate(zip(replies, sent)):
        if error is not None:
            assert reply.WhichOneof("result") == "error", i
            assert reply.error.code == error[0].value[0] and error[1] in reply.error.message, (i, reply.error)
            continue
        assert reply.WhichOneof("result") == "score", (i, reply.error)
        request = pb.ScoreRequest.FromString(data)
        expected = client.score(request.model, rows, list(request.labels) or None)
        assert (reply.score.model, reply.score.version) == (request.model, 1)
        for field in ("neg_elbo", "reconstruction", "kl"):
            np.testing.assert_allclose(getattr(reply.score, field), getattr(expected, field), **TOLERANCE, err_msg=field)
    # Each message is counted as a call of its own, under the model it names when served, else "".
    assert stream_counts(server.metrics(), before) == {
        ("vae", "OK"): 5, ("cvae", "OK"): 1, ("vae", "INVALID_ARGUMENT"): 2,
        ("", "NOT_FOUND"): 1, ("", "INVALID_ARGUMENT"): 1,
    }  # fmt: skip


@pytest.mark.parametrize(("name", "with_labels"), [("vae", False), ("ppca", False), ("cvae", False), ("cvae", True)])
def test_single_rows_with_options_equal_unary_score(client, feed, name, with_labels):
    x, labels = feed[0][:32], (feed[1][:32] if with_labels else None)
    options = dict(per_feature=True, iw_samples=4)
    answers = list(client.score_stream(name, x, labels, **options))  # 1-D rows, one label each
    assert_same_scores(answers, client.score(name, x, labels, **options))
    # A threshold of the caller's applies to every message, and so does a false-positive rate alpha.
    anomaly_score = np.concatenate([a.anomaly_score for a in answers])
    middle = float(np.median(anomaly_score))
    flagged = list(client.score_stream(name, x, labels, threshold=middle))
    assert {a.threshold for a in flagged} == {middle}
    np.testing.assert_array_equal(np.concatenate([a.is_anomaly for a in flagged]), anomaly_score > middle)
    at_alpha = list(client.score_stream(name, x, labels, alpha=0.5))
    assert {a.threshold for a in at_alpha} == {client.score(name, x[:1], labels and labels[:1], alpha=0.5).threshold}
    np.testing.assert_array_equal(np.concatenate([a.is_anomaly for a in at_alpha]),
                                  np.concatenate([a.p_value for a in answers]) <= 0.5)  # fmt: skip


def test_async_client_with_arrays_and_an_async_feed(server, client, feed):
    x, labels = feed
    sizes = [1, 5, 16, 2, 9]
    bounds = np.cumsum([0, *sizes])
    chunks = [x[a:b] for a, b in zip(bounds, bounds[1:])]  # 2-D items: a message of several rows each
    chunk_labels = [labels[a:b] for a, b in zip(bounds, bounds[1:])]
    nan = x[:3].copy()
    nan[2, 0] = np.nan

    async def rows(items):
        for item in items:
            yield item

    async def scenario():
        async with AsyncClient(server.target) as c:
            labelled = [a async for a in c.score_stream("cvae", rows(chunks), chunk_labels)]
            free = [a async for a in c.score_stream("cvae", chunks)]  # a plain iterable, label-free
            mixed = [a async for a in c.score_stream("vae", rows([x[0], nan, x[1:3]]))]  # a 1-D row, a bad and a 2-D item
            return labelled, free, mixed

    labelled, free, mixed = asyncio.run(scenario())
    assert [len(a.neg_elbo) for a in labelled] == sizes and [len(a.neg_elbo) for a in free] == sizes
    assert_same_scores(labelled, client.score("cvae", x[: bounds[-1]], labels[: bounds[-1]]))
    assert_same_scores(free, client.score("cvae", x[: bounds[-1]]))
    assert mixed[1] == StreamError(INVALID, "x: NaN or Inf at row 2, column 0")
    assert_same_scores([mixed[0], mixed[2]], client.score("vae", x[:3]))


def test_labels_that_end_before_the_rows_raise_to_the_caller(server, client, feed):
    x, labels = feed
    with pytest.raises(ValueError, match="labels ended before rows"):
        list(client.score_stream("cvae", x[:3], labels[:2]))

    async def scenario():
        async with AsyncClient(server.target) as c:
            return [a async for a in c.score_stream("cvae", x[:3], labels[:2])]

    with pytest.raises(ValueError, match="labels ended before rows"):
        asyncio.run(scenario())


WINDOW = 8
HEAVY_ROWS = 1000  # = max_batch_size: each heavy call is a batch of its own
HEAVY_CALLS = 32  # queued one behind the other, each a few tens of milliseconds of compute


async def until(condition, what: str, seconds: float = 20.0) -> None:
    """Poll `await condition()` until it holds, failing after `seconds`."""
    end = time.monotonic() + seconds
    while not await condition():
        if time.monotonic() > end:
            pytest.fail(f"not within {seconds} s: {what}")
        await asyncio.sleep(0.005)


def test_a_cancelled_stream_frees_its_queued_messages(model_repository, start_server, feed):
    """Heavy unary calls keep the vae score batcher busy, one batch at a time; a stream's messages queue
    behind them. The server takes in exactly stream_window of them, and cancelling the stream takes them
    out of the queue: none is computed."""
    x, _ = feed
    server = start_server(model_repository, stream_window=WINDOW, max_batch_size=HEAVY_ROWS, max_rows=HEAVY_ROWS)
    try:
        server.wait_serving()

        async def scenario():
            async with AsyncClient(server.target) as c:
                before = await asyncio.to_thread(server.metrics)
                heavy = [asyncio.ensure_future(c.score("vae", x, iw_samples=16)) for _ in range(HEAVY_CALLS)]

                def holds_beyond_heavy(count: int):
                    """Whether the batcher holds `count` calls beyond the heavy calls not answered here: a lower
                    bound of what else it holds (a heavy call answered there may not have arrived here yet)."""

                    async def check() -> bool:
                        not_answered = sum(not call.done() for call in heavy)  # read first: it only goes down
                        return (await asyncio.to_thread(server.metrics)).get(PENDING, 0) - not_answered >= count

                    return check

                async def stream_answered() -> bool:
                    return sum(stream_counts(await asyncio.to_thread(server.metrics), before).values()) >= WINDOW

                async def rows():
                    for row in x[: 3 * WINDOW]:
                        yield row

                async def read_all():
                    return [a async for a in c.score_stream("vae", rows())]

                await until(holds_beyond_heavy(0), "every heavy call reached the batcher")
                stream = asyncio.ensure_future(read_all())
                await until(holds_beyond_heavy(WINDOW), f"the stream's first {WINDOW} messages queued")
                assert not all(call.done() for call in heavy), "the heavy calls ended too soon to hold the stream back"
                stream.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await stream
                await until(stream_answered, f"the stream's {WINDOW} messages counted")
                for call in heavy:  # what is left of them: no need to wait for it
                    call.cancel()
                await asyncio.gather(*heavy, return_exceptions=True)
                await c.score("vae", x, iw_samples=16)  # behind whatever was computing: all batches are done
                return before, await asyncio.to_thread(server.metrics)

        before, after = asyncio.run(scenario())
        # Exactly the window was taken in, and every batch since held a heavy call's rows alone.
        assert stream_counts(after, before) == {("vae", "CANCELLED"): WINDOW}
        batches = after[BATCHES] - before.get(BATCHES, 0)
        assert batches >= 2 and after[BATCHED_ROWS] - before.get(BATCHED_ROWS, 0) == HEAVY_ROWS * batches
        assert after[PENDING] == 0

        # A stream longer than the window is answered in full, in order.
        with Client(server.target) as c:
            answers = list(c.score_stream("vae", x[:50]))
            assert_same_scores(answers, c.score("vae", x[:50]))
    finally:
        server.stop()


def test_the_drain_ends_a_stream_with_unavailable(model_repository, start_server, feed):
    """With stream_window 1 each message is answered before the next is read; on SIGTERM the stream
    ends with UNAVAILABLE once what was read is answered."""
    x, _ = feed
    server = start_server(model_repository, stream_window=1)
    release = threading.Event()

    def rows():
        yield from x[:3]
        release.wait(30)  # the feed stays open until the drain has ended the stream

    try:
        server.wait_serving()
        with Client(server.target) as c:
            answers = c.score_stream("vae", rows())
            first = [next(answers) for _ in range(3)]
            assert_same_scores(first, c.score("vae", x[:3]))
            server.process.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.RpcError) as err:
                next(answers)
            assert (err.value.code(), err.value.details()) == (grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE)
        assert server.process.wait(30) == 0
    finally:
        release.set()
        server.stop()


def test_streams_beyond_max_streams_are_refused_at_open_and_probes_are_never_refused(model_repository, start_server, feed):
    """Idle feeds hold gRPC's concurrent calls: past max_streams a stream is refused at open, and calls and
    OIP probes still get through while the others stay open."""
    from vaeserve.oip.v2 import predict_pb2 as oip_pb

    x, _ = feed
    server = start_server(model_repository, max_streams=2, max_concurrent_rpcs=4)
    request = pb.ScoreRequest(model="vae", x=tensor(x[:1]))
    try:
        server.wait_serving()

        async def scenario():
            async with grpc.aio.insecure_channel(server.target) as channel:
                stub = pb_grpc.InferenceStub(channel)
                idle = asyncio.Event()

                async def one_then_idle():
                    yield request
                    await idle.wait()

                open_streams = [stub.ScoreStream(one_then_idle()) for _ in range(2)]
                for call in open_streams:
                    assert (await call.read()).WhichOneof("result") == "score"
                async def idle_only():  # sends nothing: a write racing the refusal would fail on the client side
                    await idle.wait()
                    yield request

                refused = stub.ScoreStream(idle_only())
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await refused.read()
                live = channel.unary_unary("/inference.GRPCInferenceService/ServerLive",
                                           request_serializer=oip_pb.ServerLiveRequest.SerializeToString,
                                           response_deserializer=oip_pb.ServerLiveResponse.FromString)  # fmt: skip
                answered = await stub.Score(request, timeout=10)
                alive = await live(oip_pb.ServerLiveRequest(), timeout=10)
                idle.set()  # the feeds end: their streams close
                for call in open_streams:
                    assert await call.read() == grpc.aio.EOF
                return err.value, answered, alive

        err, answered, alive = asyncio.run(scenario())
        counted = server.metrics()[("vaeserve_rejected_total", (("reason", "overloaded"),))]
    finally:
        server.stop()
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.details() == "the server holds 2 open streams, its max_streams; retry later"
    assert len(answered.neg_elbo) == 1 and alive.live and counted >= 1


def test_the_docs_stream_example_runs(server, client):
    """docs/api.md's ScoreStream example, as written, against the test server's `vae` for `digits`."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text()
    section = text[text.index("## ScoreStream"):text.index("\n## ", text.index("## ScoreStream"))]
    [block] = re.findall(r"```python\n(.*?)```", section, re.S)
    namespace = {}
    exec(block.replace("localhost:50051", server.target).replace('"digits"', '"vae"'), namespace)
    row = np.full((1, 64), 8.0, np.float32)  # a flat grey image: far from every digit
    assert client.score("vae", row).is_anomaly[0] and namespace["flagged"] == 100
