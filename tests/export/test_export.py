"""export_checkpoint: versions, failure leaves nothing complete, manifest contents, thresholds."""

import json
import math
import shutil

import numpy as np
import pytest

from vaeserve import scoring
from vaeserve.artifact.manifest import file_sha256
from vaeserve.artifact.repository import load_version
from vaeserve.artifact.runtime import Model
from vaeserve.errors import ArtifactError, ConfigError, ExportError
from vaeserve.export.exporter import export_checkpoint
from vaeserve.normalization import Normalizer, Support
from vaeserve.training.checkpoint import load_checkpoint


def test_versions_auto_increment_and_are_never_overwritten(make_checkpoint, tmp_path):
    checkpoint = make_checkpoint("ppca", kind="ppca", latent_dim=8)
    assert export_checkpoint(checkpoint, tmp_path, "m").version == 1
    assert export_checkpoint(checkpoint, tmp_path, "m").version == 2
    assert export_checkpoint(checkpoint, tmp_path, "m", version=7).path == tmp_path / "m" / "7"
    assert export_checkpoint(checkpoint, tmp_path, "m").version == 8
    with pytest.raises(ExportError, match="already exists"):
        export_checkpoint(checkpoint, tmp_path, "m", version=2)
    # An incomplete folder (no manifest) still holds its number.
    (tmp_path / "m" / "9").mkdir()
    assert export_checkpoint(checkpoint, tmp_path, "m").version == 10
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1", "10", "2", "7", "8", "9"]


def test_bad_names_are_refused(make_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="model name"):
        export_checkpoint(make_checkpoint("ppca", kind="ppca", latent_dim=8), tmp_path, "../escape")


def test_elbo_samples_are_the_versions_own(make_checkpoint, tmp_path, digits):
    checkpoint = make_checkpoint("vae")
    with pytest.raises(ConfigError, match="--elbo-samples must be at least 1"):
        export_checkpoint(checkpoint, tmp_path, "m", elbo_samples=0)
    version = export_checkpoint(checkpoint, tmp_path, "m", elbo_samples=3)
    assert version.manifest.scoring.elbo_samples == 3
    model = Model(version)  # the score graph holds 3 samples of noise: it agrees with the NumPy scorer at 3
    assert version.manifest.score is not None and model.scorer.uses_graph()
    data, _, val, *_ = digits
    x = data.x[val][:16].astype(np.float32)
    graph, reference = model.scorer.score(x), model.scorer.score(x, reference=True)
    np.testing.assert_allclose(graph.neg_elbo, reference.neg_elbo, rtol=1e-6)
    default = Model(export_checkpoint(checkpoint, tmp_path, "m"))  # the default: other noise, other scores
    assert default.manifest.scoring.elbo_samples == scoring.ELBO_SAMPLES != 3
    assert not np.allclose(default.scorer.score(x).neg_elbo, reference.neg_elbo)


def test_failing_parity_names_the_output_and_leaves_no_version(make_checkpoint, tmp_path):
    with pytest.raises(ExportError) as failure:
        export_checkpoint(make_checkpoint("vae", kind="vae"), tmp_path, "m", tolerance=1e-12)
    message = str(failure.value)
    assert "tolerance 1e-12" in message
    # decoder.x_logits of a trained net never matches to 1e-12; its difference is printed with it.
    assert "decoder.x_logits max abs diff " in message
    diff = float(message.split("decoder.x_logits max abs diff ")[1].split(",")[0])
    assert 1e-12 < diff < 1e-4
    assert list((tmp_path / "m").iterdir()) == []  # temp folder removed, no version folder


def test_manifest_describes_the_version(model_repository, make_checkpoint):
    version = load_version(model_repository / "cvae" / "1")
    m = json.loads((version.path / "manifest.json").read_text())
    checkpoint = load_checkpoint(make_checkpoint("cvae"))
    assert m["schema_version"] == 4 and m["name"] == "cvae" and m["version"] == 1
    assert m["created"].endswith("+00:00")
    assert m["model"] == {"kind": "cvae", "arch": "mlp", "latent_dim": 4}
    assert m["input"] == {
        "features": 64, "dtype": "float32", "shape": [-1, 64], "image_shape": [1, 8, 8],
        "feature_names": checkpoint.data.feature_names,
    }
    assert m["labels"] == {"names": [str(c) for c in range(10)]}
    prior = m["scoring"]["class_prior"]
    assert math.isclose(sum(prior), 1.0) and min(prior) > 0.08
    assert {k: v for k, v in m["scoring"].items() if k not in ("class_prior", "combination")} == {
        "likelihood": "bernoulli", "elbo_samples": scoring.ELBO_SAMPLES, "iw_samples": scoring.IW_SAMPLES, "seed": scoring.SEED,
        "neighbours": {"k": scoring.NEIGHBOURS_K, "reference_rows": len(checkpoint.reference_rows()) + len(checkpoint.validation_rows()[0])}}
    assert m["scoring"]["combination"]["parts"] == ["neg_elbo", "knn"] and min(m["scoring"]["combination"]["scale"]) > 0
    normalizer = Normalizer.from_dict(m["normalization"])
    assert normalizer.kind == "minmax" and np.array_equal(normalizer.scale, checkpoint.data.normalization.scale)
    # The support is the raw range of every digits row; pixels share one range.
    support = Support.from_dict(m["support"], 64)
    assert np.array_equal(support.low, np.zeros(64)) and np.array_equal(support.high, np.full(64, 16.0))
    for graph in ("encoder", "decoder", "score", "neighbours"):
        assert m["graphs"][graph]["sha256"] == file_sha256(version.path / f"{graph}.onnx")
    assert m["source_checkpoint"]["sha256"] == checkpoint.sha256()
    assert set(m["producer"]) == {"vaeserve", "torch", "onnx", "onnxruntime"}
    assert sorted(p.name for p in version.path.iterdir()) == ["decoder.onnx", "encoder.onnx", "manifest.json", "neighbours.onnx",
                                                               "score.onnx"]  # fmt: skip
    assert m["parity"]["neighbours"]["max_rel_diff"]["knn"] <= m["parity"]["neighbours"]["tolerance"]
    assert load_version(model_repository / "vae" / "1").manifest.labels is None


@pytest.mark.parametrize("name", ["vae", "cvae", "ppca"])
def test_thresholds_are_conformal_on_the_served_scores(model_repository, make_checkpoint, name):
    """Scoring the calibration rows again through the exported graphs reproduces the stored quantiles and
    calibration scores; the default threshold is the k-th largest, k = floor(alpha (n + 1))."""
    version = load_version(model_repository / name / "1")
    m = version.manifest
    t = m.thresholds
    raw, _ = load_checkpoint(make_checkpoint(name)).calibration_rows()
    scorer = Model(version).scorer
    s, iw = scorer.score(raw, None), scorer.score(raw, None, m.scoring.iw_samples)  # as calibration scored them
    assert t.calibration_rows == raw.shape[0] == 180
    assert t.score == "combined" and t.target_false_positive_rate == 0.01 and t.label_free == (name == "cvae")
    assert t.smallest_false_positive_rate == 1 / 181 and t.promised_false_positive_rate == 1 / 181
    np.testing.assert_allclose(t.calibration_scores, np.sort(s.anomaly_score), rtol=1e-9)
    assert t.default == t.calibration_scores[-1]  # k = floor(0.01 * 181) = 1: the largest
    np.testing.assert_array_equal(s.p_value, (1 + (np.asarray(t.calibration_scores)[None] >= s.anomaly_score[:, None]).sum(1)) / 181)
    for score_name, values in (("combined", s.anomaly_score), ("neg_elbo", s.neg_elbo), ("neg_iw", iw.neg_iw)):
        stored = t.quantiles[score_name]
        assert list(stored) == ["0.95", "0.99", "0.999"]
        assert stored["0.95"] <= stored["0.99"] <= stored["0.999"]
        for q, value in stored.items():
            assert value == pytest.approx(np.quantile(values, float(q)), rel=1e-6)
    assert not s.flagged(t.default).any()  # none of the rows it is the largest of


def test_ppca_importance_weighted_score_is_its_exact_log_likelihood(model_repository, make_checkpoint):
    """PPCA's exact posterior makes every importance weight equal p(x): the exported graphs must give
    -log N(x; m, W W^T + s^2 I) to float32 precision."""
    version = load_version(model_repository / "ppca" / "1")
    checkpoint = load_checkpoint(make_checkpoint("ppca"))
    raw, _ = checkpoint.validation_rows()
    x = checkpoint.data.normalization.apply(raw[:50]).astype(np.float64)
    s = Model(version).scorer.score(raw[:50], iw_samples=16)
    cov = checkpoint.model.covariance()
    diff = x - checkpoint.model.decoder.mean.double().numpy()
    _, logdet = np.linalg.slogdet(cov)
    exact = 0.5 * (x.shape[1] * scoring.LOG_2PI + logdet + np.einsum("ij,ij->i", diff, np.linalg.solve(cov, diff.T).T))
    np.testing.assert_allclose(s.neg_iw, exact, rtol=1e-4)


def test_a_checkpoint_without_calibration_rows_calibrates_on_validation_rows_kept_out_of_the_reference(
        make_checkpoint, tmp_path, caplog):  # fmt: skip
    """Validation rows in the reference would sit at distance 0 and calibrate a threshold no new row meets."""
    checkpoint = shutil.copytree(make_checkpoint("vae"), tmp_path / "vae")
    (checkpoint / "calibration.npz").unlink()
    version = export_checkpoint(checkpoint, tmp_path / "models", "vae")
    m, ckpt = version.manifest, load_checkpoint(checkpoint)
    assert "holds no calibration rows" in caplog.text and m.thresholds.calibrated_on.startswith("validation rows")
    assert m.scoring.neighbours.reference_rows == len(ckpt.reference_rows())  # the training rows only
    s = Model(version).scorer.score(ckpt.validation_rows()[0])
    assert (s.knn > 0).all() and np.mean(s.flagged(m.thresholds.default)) <= 0.01


def test_a_corrupt_checkpoint_file_is_named(make_checkpoint, tmp_path):
    checkpoint = shutil.copytree(make_checkpoint("vae"), tmp_path / "vae")
    (checkpoint / "calibration.npz").write_bytes((checkpoint / "calibration.npz").read_bytes()[:100])
    with pytest.raises(ArtifactError, match=r"calibration\.npz: cannot be read .*; train the model again"):
        export_checkpoint(checkpoint, tmp_path / "models", "vae")
