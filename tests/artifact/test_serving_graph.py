"""The serving graph (vaeserve.artifact.serving_graph): a version with a score graph scores finite rows given
their labels in one ONNX Runtime call, to the scores, flags, support distances and p-values of the Scorer's
own path (the score graph, the neighbour graph and NumPy), inside the support and far outside it; label-free
CVAE rows and rows holding a NaN or an infinity stay on that path; a serving graph that disagrees is left
out at load, with a warning, and the version scores as before."""

import logging

import numpy as np
import pytest

from vaeserve.artifact import runtime, serving_graph
from vaeserve.artifact.repository import load_version
from vaeserve.artifact.runtime import Model
from vaeserve.normalization import Normalizer

MODELS = ("vae", "cvae", "ppca")
FIELDS = ("neg_elbo", "reconstruction", "kl", "per_feature", "knn", "anomaly_score", "p_value")


def counted(scorer):
    """Count the scorer's calls of its serving graph."""
    calls, serve = [0], scorer.serving

    def serving(x, y):
        calls[0] += 1
        return serve(x, y)

    scorer.serving = serving
    return calls, serve


def own_path(scorer, x, y):
    """The scores of the Scorer's own path (score graph, neighbour graph, NumPy) for the same rows."""
    serving, scorer.serving = scorer.serving, None
    try:
        return scorer.score(x, y)
    finally:
        scorer.serving = serving


def assert_same(got, want):
    for name in FIELDS:
        a, b = getattr(got, name), getattr(want, name)
        assert a.shape == b.shape and not np.isnan(a).any(), name
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=0, err_msg=name)
    np.testing.assert_array_equal(got.out_of_support, want.out_of_support)
    np.testing.assert_array_equal(got.distances(), want.distances())
    assert (got.support_distance is None) == (want.support_distance is None)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("batch", [1, 64, "chunk+3"])
def test_serving_graph_scores_as_the_scorers_own_path(models, held_out, name, batch):
    scorer = models[name].scorer
    assert models[name].serving is not None
    rows = scorer.chunk_values // scorer.reference_rows + 3 if batch == "chunk+3" else batch
    raw, labels = held_out[name]
    index = np.arange(rows) % len(raw)
    x, y = raw[index], labels[index] if name == "cvae" else None
    calls, serve = counted(scorer)
    try:
        got = scorer.score(x, y)
        assert calls[0] == (2 if batch == "chunk+3" else 1)  # one call per chunk
    finally:
        scorer.serving = serve
    assert_same(got, own_path(scorer, x, y))
    assert got.support_distance is None  # held-out rows are inside the support


@pytest.mark.parametrize("name", MODELS)
def test_rows_far_outside_the_support_get_the_same_penalty(models, held_out, name):
    scorer, m = models[name].scorer, models[name].manifest
    raw, labels = held_out[name]
    x, y = raw[:5].copy(), labels[:5] if name == "cvae" else None
    x[0, 5] = m.support.high[5] + 3.0
    x[2, [1, 40]] = m.support.low[[1, 40]] - 1e30
    x[3] = 3.0e38  # every value at the edge of float32
    got = scorer.score(x, y)
    assert_same(got, own_path(scorer, x, y))
    np.testing.assert_array_equal(got.out_of_support, [True, False, True, True, False])
    assert got.flagged(m.thresholds.default)[[2, 3]].all()


def test_label_free_and_non_finite_rows_stay_on_the_scorers_path(models, held_out):
    scorer = models["cvae"].scorer
    raw, labels = held_out["cvae"]
    calls, serve = counted(scorer)
    try:
        label_free = scorer.score(raw[:4])
        x = raw[:4].copy()
        x[1, 3] = np.nan
        nan_rows = scorer.score(x, labels[:4])
        assert calls[0] == 0
        assert nan_rows.neg_elbo[1] == np.inf and np.isfinite(nan_rows.neg_elbo[[0, 2, 3]]).all()
        scorer.score(raw[:4], labels[:4])
        assert calls[0] == 1
    finally:
        scorer.serving = serve
    assert_same(label_free, own_path(scorer, raw[:4], None))


def test_a_serving_graph_that_disagrees_is_left_out(model_repository, monkeypatch, caplog):
    build = serving_graph.build

    def wrong_scale(score, neighbours, normalizer, *args):  # a graph built on another normalisation
        return build(score, neighbours, Normalizer(normalizer.kind, normalizer.shift, normalizer.scale * 2, normalizer.clip), *args)

    monkeypatch.setattr(runtime.serving_graph, "build", wrong_scale)
    with caplog.at_level(logging.WARNING, logger="vaeserve.artifact.runtime"):
        model = Model(load_version(model_repository / "vae" / "1"))
    assert model.serving is None and model.scorer.serving is None
    assert "the serving graph disagrees with the score graph and NumPy" in caplog.text
    x = np.stack([model.manifest.support.low, model.manifest.support.high]).astype(np.float32)
    assert np.isfinite(model.scorer.score(x).anomaly_score).all()  # scored on the Scorer's own path
