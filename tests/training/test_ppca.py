"""PPCA: the closed-form held-out log-likelihood against an independent reference, and the
importance-weighted estimate with PPCA's exact posterior against the closed form."""

import numpy as np
from scipy.stats import multivariate_normal

from vaeserve.training.checkpoint import load_checkpoint
from vaeserve.training.evaluate import exact_log_likelihood, scorer


def test_exact_log_likelihood_matches_scipy(ppca_run):
    checkpoint = load_checkpoint(ppca_run)
    x_raw, _ = checkpoint.validation_rows()
    x = checkpoint.data.normalization.apply(x_raw).astype(np.float64)
    ours = exact_log_likelihood(checkpoint.model, x)
    # Independent: covariance rebuilt from the decoder's W and s^2, scipy's logpdf (eigendecomposition).
    w = checkpoint.model.decoder.weight.double().numpy()
    s2 = float(np.exp(checkpoint.model.decoder.logvar.double().item()))
    reference = multivariate_normal(checkpoint.model.decoder.mean.double().numpy(), w @ w.T + s2 * np.eye(w.shape[0])).logpdf(x)
    np.testing.assert_allclose(ours, reference, rtol=1e-6)
    assert checkpoint.metrics["validation"]["exact_log_likelihood"] == np.mean(ours)


def test_importance_weighted_estimate_equals_exact(ppca_run):
    checkpoint = load_checkpoint(ppca_run)
    x_raw, _ = checkpoint.validation_rows()
    x = checkpoint.data.normalization.apply(x_raw)
    exact = exact_log_likelihood(checkpoint.model, x)
    for k in (1, 100):
        estimate = -scorer(checkpoint.model, checkpoint.data).score(x_raw, iw_samples=k).neg_iw
        assert np.max(np.abs(estimate - exact)) < 1e-4, (k, np.max(np.abs(estimate - exact)))
