"""The Python client against a real server: big inputs split within the server's limits and joined in
order, typed errors, one row as a 1-D array, the typed GetModel, and docs/api.md's client examples."""

import asyncio
import pickle
import re
from pathlib import Path

import grpc
import numpy as np
import pytest

from vaeserve.service.client import (
    AsyncClient, Calibration, Client, DeadlineExceeded, InvalidInput, Limits, ModelInfo, NotFound, ServerError,
    StreamError, Unavailable,
)  # fmt: skip

DOCS = Path(__file__).resolve().parents[2] / "docs" / "api.md"


@pytest.fixture(scope="module")
def many(digits):
    """2,500 distinct raw rows: every digit once, then shifted copies (a few values outside the support)."""
    data, _, _, *_ = digits
    x = data.x.astype(np.float32)
    return np.concatenate([x, x[:2500 - len(x)] * 0.5 + 1.0])


def requests_of(server, method: str) -> float:
    return sum(v for (name, labels), v in server.metrics().items()
               if name == "vaeserve_requests_total" and dict(labels).get("method") == method)  # fmt: skip


def test_a_big_input_is_split_within_max_rows_and_joined_in_order(client, many, limits):
    seen = []
    scored = client.score("vae", many, per_feature=True, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(1000, 2500), (2000, 2500), (2500, 2500)]  # max_rows 1000 per request, in row order
    assert scored.neg_elbo.shape == (2500,) and scored.per_feature.shape == (2500, 64) and scored.version == 1
    assert scored.anomaly_score.shape == scored.p_value.shape == scored.knn_distance.shape == (2500,)
    at_alpha = client.score("vae", many, alpha=0.2)  # every request of the split call flags at the same rate
    np.testing.assert_array_equal(at_alpha.is_anomaly, scored.p_value <= 0.2)
    for start in (0, 1000, 2400):  # the same rows sent on their own
        alone = client.score("vae", many[start:start + 50], per_feature=True)
        np.testing.assert_allclose(scored.neg_elbo[start:start + 50], alone.neg_elbo, rtol=1e-12)
        np.testing.assert_allclose(scored.per_feature[start:start + 50], alone.per_feature, rtol=1e-6)
        np.testing.assert_array_equal(scored.is_anomaly[start:start + 50], alone.is_anomaly)
        for field in ("anomaly_score", "p_value", "knn_distance"):
            np.testing.assert_allclose(getattr(scored, field)[start:start + 50], getattr(alone, field), rtol=1e-12, err_msg=field)
    embedded = client.embed("ppca", many)
    np.testing.assert_allclose(embedded.mu[1500:1510], client.embed("ppca", many[1500:1510]).mu, rtol=1e-6)
    decoded = client.decode("vae", embedded.mu[:, :4])
    assert decoded.shape == (2500, 64)
    np.testing.assert_allclose(decoded[2499], client.decode("vae", embedded.mu[2499, :4])[0], rtol=1e-6)
    assert client.generate("vae", 1500, seed=1).x.shape == (1500, 64)


def test_the_work_budget_splits_label_free_cvae_rows_and_seeded_samples(model_repository, start_server, many):
    # A label-free CVAE row at K=64 is (2 + 64) samples x 10 classes x 64 features = 42,240 values: 2 rows a request.
    server = start_server(model_repository, max_request_values=100_000)
    try:
        server.wait_serving()
        x = many[:9]
        with Client(server.target) as client:
            seen = []
            scored = client.score("cvae", x, iw_samples=64, progress=lambda done, total: seen.append(done))
            assert seen == [2, 4, 6, 8, 9]
            assert client.get_model("cvae").limits.max_request_values == 100_000
            for start in range(0, 9, 2):
                alone = client.score("cvae", x[start:start + 2], iw_samples=64)
                np.testing.assert_allclose(scored.neg_iw[start:start + 2], alone.neg_iw, rtol=1e-12)
            # 200 posterior samples x 4 latent dimensions = 800 values a row: 125 rows a request, seeds 5, 6, 7.
            rows = many[:300]
            embedded = client.embed("vae", rows, posterior_samples=200, seed=5)
            assert embedded.samples.shape == (200, 300, 4)
            for k, start in enumerate((0, 125, 250)):
                alone = client.embed("vae", rows[start:start + 125], posterior_samples=200, seed=5 + k)
                np.testing.assert_array_equal(embedded.samples[:, start:start + 125], alone.samples)

        async def concurrently():
            # One request in flight per call: the score queue holds 4 x max_request_values of work at most.
            async with AsyncClient(server.target, in_flight=1) as client:
                before = await asyncio.to_thread(requests_of, server, "GetModel")
                await client.score("cvae", x[:4])  # small, no samples: sent without asking for the limits
                small = await asyncio.to_thread(requests_of, server, "GetModel")
                answers = await asyncio.gather(*(client.score("cvae", x, iw_samples=64) for _ in range(3)))
                after = await asyncio.to_thread(requests_of, server, "GetModel")
                return answers, small - before, after - small

        answers, small, shared = asyncio.run(concurrently())
        assert (small, shared) == (0, 1)  # three concurrent split calls share one GetModel
        for answer in answers:
            np.testing.assert_allclose(answer.neg_iw, scored.neg_iw, rtol=1e-12)
    finally:
        server.stop()


def test_errors_are_typed_with_the_code_and_the_servers_message(server, client, rows):
    x, _ = rows
    with pytest.raises(NotFound) as caught:
        client.score("nope", x)
    err = caught.value
    assert err.code() == grpc.StatusCode.NOT_FOUND and str(err) == err.details()
    assert str(err).startswith("no model 'nope'") and "vae" in str(err)
    assert isinstance(err, ServerError) and isinstance(err, grpc.RpcError)  # old `except grpc.RpcError` still catches
    assert isinstance(err.__cause__, grpc.RpcError) and err.__cause__.code() == grpc.StatusCode.NOT_FOUND
    assert repr(pickle.loads(pickle.dumps(err))) == repr(err)

    with pytest.raises(InvalidInput, match="the model takes 64 values per row, got 3") as caught:
        client.score("vae", x[:, :3])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with Client(server.target, timeout=0.02) as hurried, pytest.raises(DeadlineExceeded):
        hurried.score("cvae", np.full((128, 64), 8.0), iw_samples=256)  # label-free, K=256: a few tenths of a second
    with Client("127.0.0.1:1", timeout=5) as nobody, pytest.raises(Unavailable):
        nobody.models()

    async def asynchronous():
        async with AsyncClient(server.target) as c:
            with pytest.raises(NotFound) as refused:
                await c.embed("vae", x, version=7)
            with pytest.raises(InvalidInput, match="give a threshold or alpha, not both") as both:
                await c.score("vae", x, threshold=1.0, alpha=0.1)
            return refused.value, both.value, await c.score("vae", x, alpha=0.5)

    refused, both, at_alpha = asyncio.run(asynchronous())
    assert refused.code() == grpc.StatusCode.NOT_FOUND and "version 7" in str(refused)
    assert both.code() == grpc.StatusCode.INVALID_ARGUMENT
    np.testing.assert_array_equal(at_alpha.is_anomaly, at_alpha.p_value <= 0.5)
    assert at_alpha.threshold == client.score("vae", x, alpha=0.5).threshold
    # On a stream a refused message is an item, and the stream goes on.
    answers = list(client.score_stream("vae", [x[0], x[0, :3], x[1]]))
    assert isinstance(answers[1], StreamError) and answers[1].code == grpc.StatusCode.INVALID_ARGUMENT
    np.testing.assert_allclose(answers[2].neg_elbo, client.score("vae", x[1:2]).neg_elbo, rtol=1e-12)


def test_one_row_as_a_1d_array(client, rows):
    x, labels = rows
    row, label = x[3], labels[3]
    as_2d = client.score("cvae", x[3:4], [label], per_feature=True)
    one = client.score("cvae", row, label, per_feature=True)
    assert one.neg_elbo.shape == (1,) and one.per_feature.shape == (1, 64)
    np.testing.assert_allclose(one.neg_elbo, as_2d.neg_elbo, rtol=1e-12)
    embedded = client.embed("vae", row)
    np.testing.assert_allclose(embedded.mu, client.embed("vae", x[3:4]).mu, rtol=1e-6)
    rebuilt = client.reconstruct("vae", row)
    assert rebuilt.x.shape == (1, 64) and rebuilt.neg_log_likelihood.shape == (1,)
    assert client.decode("vae", embedded.mu[0]).shape == (1, 64)


def test_get_model_is_typed(client, model_repository):
    from vaeserve.artifact.manifest import read_manifest

    info = client.get_model("cvae")
    manifest = read_manifest(model_repository / "cvae" / "1")
    assert isinstance(info, ModelInfo) and (info.name, info.version, info.kind) == ("cvae", 1, "cvae") and info.conditional
    assert (info.features, info.latent_dim, info.likelihood) == (64, 4, "bernoulli")
    assert info.feature_names == tuple(manifest.input.feature_names) and info.labels == tuple(manifest.labels)
    t = manifest.thresholds
    assert info.threshold == t.default and info.threshold_score == t.score == "combined"
    # Conformal: the default threshold is the calibration score of rank k = floor(0.01 (n + 1)) from the top (the
    # largest when k is 0), no quantile, and holds k / (n + 1) (1 / (n + 1)).
    n = t.calibration_rows
    k = int(0.01 * (n + 1))
    assert info.calibration == Calibration(None, 0.01, n, t.calibrated_on, True, max(k, 1) / (n + 1), 1 / (n + 1))
    assert info.calibration.target_reached == (k >= 1)
    assert list(info.quantiles) == ["combined", "neg_elbo", "neg_iw"] and list(info.quantiles["neg_elbo"]) == ["0.95", "0.99", "0.999"]
    assert (info.elbo_samples, info.iw_samples) == (manifest.scoring.elbo_samples, manifest.scoring.iw_samples)
    assert set(info.providers) == {"encoder", "decoder", "score"} and all(info.providers.values())
    assert info.limits == Limits(max_rows=1000, max_request_values=2**25, max_iw_samples=256, max_posterior_samples=256)
    np.testing.assert_array_equal(info.support_high, manifest.support.high)
    assert info.manifest["name"] == "cvae" and info.metadata.name == "cvae"
    assert client.get_model("vae").labels == () and not client.get_model("vae").conditional


def test_the_docs_client_examples_run(server, client, rows, tmp_path, capsys):
    """Every Python block of docs/api.md's Clients section, as written, in order in one namespace, against the
    test server's `vae` for `digits` and a copy of a quickstart's sample_rows.csv."""
    from vaeserve.training.checkpoint import save_sample_rows

    x = rows[0][:8]
    save_sample_rows(tmp_path, x, client.get_model("vae").feature_names)
    text = DOCS.read_text()
    section = text[text.index("## Clients"):text.index("\n## ", text.index("## Clients"))]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) >= 2 and "AsyncClient" in blocks[1]
    namespace = {}
    for block in blocks:
        block = block.replace("localhost:50051", server.target).replace('"digits"', '"vae"')
        exec(block.replace("runs/digits/sample_rows.csv", str(tmp_path / "sample_rows.csv")), namespace)
    expected = client.score("vae", x, iw_samples=64)
    np.testing.assert_allclose(namespace["r"].neg_iw, expected.neg_iw, rtol=0, atol=1e-6)
    assert namespace["one"].neg_elbo.shape == (1,) and namespace["scores"].neg_elbo.shape == (20_000,)
    np.testing.assert_allclose(namespace["neg_elbo"], client.score("vae", x).neg_elbo, rtol=1e-12)
    assert namespace["mu"].shape == (8, 4)
    printed = capsys.readouterr().out
    assert "1000/20000 rows" in printed and "20000/20000 rows" in printed
    assert "INVALID_ARGUMENT x: the model takes 64 values per row, got 10" in printed


def test_a_split_call_retries_the_parts_a_full_server_refuses(model_repository, start_server, rows):
    """Four parts in flight against a server that holds one call at a time: some are answered Overloaded
    and sent again, and the call's answer is whole and in order."""
    import asyncio

    from vaeserve.service.client import AsyncClient, Client

    x = np.concatenate([rows[0]] * 64)  # 2,048 rows: 8 parts of 256
    server = start_server(model_repository, max_rows=256, max_concurrent_rpcs=1)
    try:
        server.wait_serving()
        with Client(server.target) as client:
            expected = np.concatenate([client.score("vae", x[i:i + 256]).neg_elbo for i in range(0, len(x), 256)])
            got = client.score("vae", x).neg_elbo

        async def concurrently():
            async with AsyncClient(server.target) as client:
                return await asyncio.gather(*(client.score("vae", x) for _ in range(2)))

        answers = asyncio.run(concurrently())
        refused = server.metrics()[("vaeserve_rejected_total", (("reason", "overloaded"),))]
    finally:
        server.stop()
    np.testing.assert_array_equal(got, expected)
    for answer in answers:
        np.testing.assert_array_equal(answer.neg_elbo, expected)
    assert refused > 0  # parts were refused, and their retries answered
