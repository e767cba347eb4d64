"""Every RPC on the VAE, CVAE and PPCA models against a real server, checked against the same graphs
run in-process through ONNX Runtime."""

import asyncio
import json

import grpc
import numpy as np
import pytest

from vaeserve import errors, scoring
from vaeserve.artifact.repository import scan_repository
from vaeserve.artifact.runtime import Model
from vaeserve.conformal import Calibration
from vaeserve.service.client import InvalidInput

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
        t, saved = meta.metadata.thresholds, ref.manifest.thresholds
        assert (t.score, t.calibration_rows, t.calibrated_on) == (saved.score, saved.calibration_rows, saved.calibrated_on)
        assert (t.target_false_positive_rate, t.promised_false_positive_rate, t.smallest_false_positive_rate) == (
            saved.target_false_positive_rate, saved.promised_false_positive_rate, saved.smallest_false_positive_rate or 0.0)
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
    np.testing.assert_allclose(got.anomaly_score, expected.anomaly_score, rtol=1e-5, atol=1e-4)
    for field, want in (("knn_distance", expected.knn), ("p_value", expected.p_value)):
        if want is None:
            assert getattr(got, field) is None, field
        else:
            np.testing.assert_allclose(getattr(got, field), want, rtol=1e-6, atol=1e-9, err_msg=field)
    assert got.threshold == pytest.approx(default)
    np.testing.assert_array_equal(got.is_anomaly, got.anomaly_score > default)
    # A per-request threshold overrides the manifest's.
    middle = float(np.median(got.anomaly_score))
    override = client.score(name, x, labels, threshold=middle)
    assert override.threshold == middle and override.per_feature is None and override.neg_iw is None
    np.testing.assert_array_equal(override.is_anomaly, got.anomaly_score > middle)


def calibrated(ref: Reference) -> Calibration:
    thresholds = ref.manifest.thresholds
    if thresholds.calibration_scores is None:
        pytest.skip(f"{ref.manifest.name} was exported without conformal calibration")
    return Calibration.of(np.asarray(thresholds.calibration_scores))


@pytest.mark.parametrize(("name", "with_labels"), [(name, False) for name in MODELS] + [("cvae", True)])
def test_p_values_follow_the_calibration_scores(client, references, rows, name, with_labels):
    """p = (1 + #{calibration scores >= anomaly_score}) / (n + 1), from the manifest's scores, and so in [1/(n+1), 1]."""
    x, labels = rows
    ref = references[name]
    calibration = calibrated(ref)
    x = np.vstack([x, np.full((1, 64), 8.0, np.float32), x[:1] * 0 + 16.0])  # and two rows unlike any digit
    labels = labels + ["3", "3"] if with_labels else None
    got = client.score(name, x, labels)
    n = calibration.rows
    assert n == ref.manifest.thresholds.calibration_rows
    expected = (1 + (calibration.scores[None, :] >= got.anomaly_score[:, None]).sum(axis=1)) / (n + 1)
    np.testing.assert_array_equal(got.p_value, expected)
    assert ((got.p_value >= 1 / (n + 1)) & (got.p_value <= 1)).all()
    assert got.p_value[-1] == 1 / (n + 1)  # every pixel at its maximum: above every calibration score


@pytest.mark.parametrize("name", MODELS)
def test_alpha_flags_the_rows_whose_p_value_is_at_most_alpha(client, references, rows, name):
    x, _ = rows
    x = np.vstack([x, x[:8] * 0.5 + 4.0])  # some rows less like the calibration rows
    calibration = calibrated(references[name])
    plain = client.score(name, x)
    for alpha in (calibration.smallest_rate, 0.05, 0.25, 0.5, 0.9):
        at_alpha = client.score(name, x, alpha=alpha)
        threshold = calibration.threshold(alpha)
        assert at_alpha.threshold == threshold
        np.testing.assert_array_equal(at_alpha.is_anomaly, plain.p_value <= alpha, err_msg=str(alpha))
        np.testing.assert_array_equal(at_alpha.is_anomaly, client.score(name, x, threshold=threshold).is_anomaly)
        np.testing.assert_array_equal(at_alpha.p_value, plain.p_value)
    assert 0 < client.score(name, x, alpha=0.5).is_anomaly.sum() < len(x)


def test_alpha_refusals(client, references, rows):
    x, _ = rows
    calibration = calibrated(references["vae"])

    def refusal(**options) -> str:
        with pytest.raises(InvalidInput) as caught:
            client.score("vae", x, **options)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        return str(caught.value)

    assert refusal(alpha=0.1, threshold=1.0) == "give a threshold or alpha, not both: alpha sets the threshold"
    below = calibration.smallest_rate / 2
    with pytest.raises(errors.InvalidInput) as expected:  # Calibration's own message
        calibration.threshold(below)
    assert refusal(alpha=below) == str(expected.value) and "out of reach" in str(expected.value)
    for alpha in (0.0, 1.0, -0.5, float("nan")):
        assert refusal(alpha=alpha).startswith("alpha must be in (0, 1), got "), alpha


def test_a_version_without_conformal_calibration(model_repository, start_server, rows, tmp_path):
    """A version whose manifest has no calibration scores nor neighbours (as exported before them) answers no
    p-values or distances, on either protocol, flags on neg_elbo and refuses alpha."""
    import shutil

    from tritonclient.grpc import InferenceServerClient, InferInput

    from vaeserve.service.client import Client

    folder = tmp_path / "repo" / "vae" / "1"
    shutil.copytree(model_repository / "vae" / "1", folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["schema_version"] = 3
    for key in ("promised_false_positive_rate", "smallest_false_positive_rate", "calibration_scores"):
        manifest["thresholds"].pop(key, None)
    manifest["thresholds"] |= {"score": "neg_elbo", "default": manifest["thresholds"]["quantiles"]["neg_elbo"]["0.99"]}
    manifest["thresholds"]["quantiles"].pop("combined", None)
    for key in ("neighbours", "combination"):
        manifest["scoring"].pop(key, None)
    manifest["graphs"].pop("neighbours", None)
    manifest["parity"].pop("neighbours", None)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    x, _ = rows
    server = start_server(tmp_path / "repo")
    try:
        server.wait_serving()
        with Client(server.target) as client:
            got = client.score("vae", x)
            with pytest.raises(InvalidInput) as refused:
                client.score("vae", x, alpha=0.1)
            info = client.get_model("vae")
        with InferenceServerClient(server.target) as triton:
            outputs = [t.name for t in triton.get_model_metadata("vae").outputs]
            tensor = InferInput("x", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            result = triton.infer("vae", [tensor])
    finally:
        server.stop()
    assert "anomaly_score" in outputs and "p_value" not in outputs and "knn_distance" not in outputs
    assert result.as_numpy("p_value") is None and result.as_numpy("knn_distance") is None
    np.testing.assert_array_equal(result.as_numpy("anomaly_score"), got.neg_elbo)
    assert got.p_value is None and got.knn_distance is None
    np.testing.assert_array_equal(got.anomaly_score, got.neg_elbo)
    np.testing.assert_array_equal(got.is_anomaly, got.neg_elbo > got.threshold)
    assert str(refused.value) == ("model 'vae' version 1 was exported without conformal calibration: it has no "
                                  "p-values to flag at alpha; send a threshold")  # fmt: skip
    t = info.metadata.thresholds
    assert (t.score, t.smallest_false_positive_rate, t.promised_false_positive_rate) == ("neg_elbo", 0.0, t.target_false_positive_rate)
    assert info.calibration.smallest_false_positive_rate is None and info.calibration.target_reached


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
