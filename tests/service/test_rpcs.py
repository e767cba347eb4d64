"""Every RPC on the VAE, CVAE and PPCA models against a real server, checked against the same graphs
run in-process through ONNX Runtime."""

import asyncio

import numpy as np
import pytest

from vaeserve import scoring
from vaeserve.artifact.repository import scan_repository
from vaeserve.artifact.runtime import Model

MODELS = ["vae", "cvae", "ppca"]


class Reference:
    """A model version opened in-process (the same artifact and Scorer), for expected values."""

    def __init__(self, version):
        self.model = Model(version)
        self.manifest = version.manifest
        self.encoder, self.encode, self.decode = self.model.encoder, self.model.encode, self.model.decode
        self.normalizer = self.manifest.normalization
        self.likelihood = self.manifest.scoring.likelihood
        self.labels = list(self.manifest.labels) if self.manifest.labels else None

    def one_hot(self, labels):
        return None if labels is None else np.eye(len(self.labels), dtype=np.float32)[[self.labels.index(l) for l in labels]]

    def decode_mean(self, z, y):
        return self.normalizer.invert(scoring.decoder_mean(self.decode(z, y), self.likelihood))


@pytest.fixture(scope="module")
def references(model_repository):
    return {name: Reference(versions[1]) for name, versions in scan_repository(model_repository).items()}


def labels_for(name, labels):
    return labels if name == "cvae" else None


def test_list_and_get_model(client, references):
    assert client.models() == {"cvae": [1], "ppca": [1], "vae": [1]}
    for name, ref in references.items():
        meta = client.get_model(name)
        assert (meta.name, meta.version, meta.kind) == (name, 1, ref.manifest.model.kind)
        assert meta.latent_dim == ref.manifest.model.latent_dim and meta.features == 64
        assert list(meta.providers["encoder"]) == ref.encoder.providers
        assert meta.metadata.encoder.sha256 == ref.manifest.encoder.sha256
        assert meta.metadata.score.sha256 == ref.manifest.score.sha256  # exported with its score graph
        assert list(meta.providers["score"]) == ref.model.score_graph.providers and "neg_elbo" in meta.metadata.score.outputs
        assert meta.threshold == pytest.approx(ref.manifest.thresholds.default)
        assert list(meta.labels) == (ref.labels if name == "cvae" else [])
        np.testing.assert_array_equal(meta.support_low, ref.manifest.support.low)
        np.testing.assert_array_equal(meta.support_high, ref.manifest.support.high)
        assert (meta.limits.max_rows, meta.limits.max_iw_samples) == (1000, 256)  # the session server's
        assert meta.limits.max_request_values > 0 and meta.limits.max_posterior_samples > 0


@pytest.mark.parametrize("name", MODELS)
def test_embed(client, references, rows, name):
    x, labels = rows
    ref = references[name]
    y = ref.one_hot(labels_for(name, labels))
    mu, logvar = ref.encode(ref.normalizer.apply(x), y)
    got = client.embed(name, x, labels_for(name, labels), posterior_samples=3, seed=7)
    np.testing.assert_allclose(got.mu, mu, atol=1e-5)
    np.testing.assert_allclose(got.logvar, logvar, atol=1e-5)
    assert got.samples.shape == (3, *mu.shape)
    again = client.embed(name, x, labels_for(name, labels), posterior_samples=3, seed=7)
    np.testing.assert_array_equal(again.samples, got.samples)  # seeded


@pytest.mark.parametrize("name", MODELS)
def test_reconstruct(client, references, rows, name):
    x, labels = rows
    ref = references[name]
    y = ref.one_hot(labels_for(name, labels))
    mu, _ = ref.encode(ref.normalizer.apply(x), y)
    expected = ref.decode_mean(mu, y)
    got = client.reconstruct(name, x, labels_for(name, labels))
    np.testing.assert_allclose(got.x, expected, atol=1e-4)
    np.testing.assert_allclose(got.mean_squared_error, np.mean((x - expected) ** 2, axis=1), rtol=1e-4)
    params = ref.decode(mu, y)
    nll = -scoring.feature_log_likelihood(ref.normalizer.apply(x).astype(np.float64), params, ref.likelihood).sum(1)
    np.testing.assert_allclose(got.neg_log_likelihood, nll, rtol=1e-4)


@pytest.mark.parametrize(
    ("name", "with_labels"), [(name, False) for name in MODELS] + [("cvae", True)]  # labels: CVAE only
)
def test_score(client, references, rows, name, with_labels):
    x, labels = rows
    ref = references[name]
    labels = labels if with_labels else None
    default = ref.manifest.thresholds.default
    expected = ref.model.scorer.score(x, ref.one_hot(labels), iw_samples=16)
    got = client.score(name, x, labels, per_feature=True, iw_samples=16)
    np.testing.assert_allclose(got.neg_elbo, expected.neg_elbo, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got.reconstruction, expected.reconstruction, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got.kl, expected.kl, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got.neg_iw, expected.neg_iw, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got.per_feature, expected.per_feature, rtol=1e-4, atol=1e-4)
    assert got.threshold == pytest.approx(default)
    np.testing.assert_array_equal(got.is_anomaly, got.neg_elbo > default)
    # A per-request threshold overrides the manifest's.
    middle = float(np.median(got.neg_elbo))
    override = client.score(name, x, labels, threshold=middle)
    assert override.threshold == middle and override.per_feature is None and override.neg_iw is None
    np.testing.assert_array_equal(override.is_anomaly, got.neg_elbo > middle)


@pytest.mark.parametrize("name", MODELS)
def test_generate_and_decode(client, references, rows, name):
    ref = references[name]
    labels = ["3", "3", "7"] if name == "cvae" else None
    got = client.generate(name, 0 if labels else 3, labels, temperature=0.5, seed=11)
    assert got.x.shape == (3, 64) and got.z.shape == (3, ref.manifest.model.latent_dim)
    z = np.random.default_rng(11).standard_normal(got.z.shape, dtype=np.float32) * np.float32(0.5)
    np.testing.assert_allclose(got.z, z, atol=1e-6)
    np.testing.assert_allclose(got.x, ref.decode_mean(z, ref.one_hot(labels)), atol=1e-4)
    decoded = client.decode(name, got.z, labels)
    np.testing.assert_allclose(decoded, got.x, atol=1e-5)


def test_ppca_score_is_exact_log_likelihood(client, references, rows):
    """PPCA: p(x) = N(m, W W^T + s^2 I) in normalised space; the service's K-sample estimate must match it.
    W and s^2 come from the decoder graph: x_mean(e_i) - x_mean(0) and exp(x_logvar)."""
    x, _ = rows
    ref = references["ppca"]
    latent = ref.manifest.model.latent_dim
    z = np.vstack([np.zeros((1, latent)), np.eye(latent)]).astype(np.float32)
    out = ref.decode(z, None)
    m = out["x_mean"][0].astype(np.float64)
    w = (out["x_mean"][1:] - out["x_mean"][0]).astype(np.float64).T  # [features, latent]
    s2 = np.exp(out["x_logvar"][0].astype(np.float64))
    cov = w @ w.T + np.diag(s2)
    d = ref.normalizer.apply(x).astype(np.float64) - m
    _, logdet = np.linalg.slogdet(cov)
    log_px = -0.5 * (len(m) * np.log(2 * np.pi) + logdet + np.einsum("ij,ij->i", d @ np.linalg.inv(cov), d))
    got = client.score("ppca", x, iw_samples=64)
    np.testing.assert_allclose(got.neg_iw, -log_px, atol=1e-3, rtol=0)


def test_one_request_equals_64_concurrent(server, client, rows):
    from vaeserve.service.client import AsyncClient

    x, labels = rows
    x = np.vstack([x, x + 1.0])  # 64 rows
    labels = labels * 2
    for name in MODELS:
        whole = client.score(name, x, labels_for(name, labels), iw_samples=8)

        async def each():
            async with AsyncClient(server.target) as c:
                return await asyncio.gather(*(
                    c.score(name, x[i : i + 1], labels_for(name, labels[i : i + 1]), iw_samples=8) for i in range(64)
                ))  # fmt: skip

        parts = asyncio.run(each())
        for field in ("neg_elbo", "reconstruction", "kl", "neg_iw"):
            np.testing.assert_allclose(np.concatenate([getattr(p, field) for p in parts]), getattr(whole, field), rtol=1e-5, atol=1e-5)
    # The 64 callers shared batches: some Score batch held more than one row.
    metrics = server.metrics()
    bucket = metrics[("vaeserve_batch_rows_bucket", (("graph", "score"), ("le", "1.0"), ("model", "vae")))]
    count = metrics[("vaeserve_batch_rows_count", (("graph", "score"), ("model", "vae")))]
    assert bucket < count
