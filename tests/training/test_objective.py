"""The ELBO's pieces: closed-form KL against Monte Carlo, and the importance-weighted bound against the ELBO."""

import numpy as np
import pytest
import torch

from vaeserve import scoring
from vaeserve.training.checkpoint import load_checkpoint
from vaeserve.training.evaluate import scorer
from vaeserve.training.model import ModelConfig, build_model, elbo_loss


def test_closed_form_kl_matches_monte_carlo():
    rng = np.random.default_rng(0)
    mu = rng.normal(size=(5, 3))
    logvar = rng.normal(scale=0.7, size=(5, 3))
    eps = rng.standard_normal((200_000, 1, 3))
    z = mu + np.exp(0.5 * logvar) * eps
    # KL = E_q[log q(z) - log p(z)], estimated by sampling q
    log_ratio = (scoring.log_normal(z, mu, logvar) - scoring.log_normal(z, 0.0, 0.0)).sum(axis=-1)
    monte_carlo, stderr = log_ratio.mean(axis=0), log_ratio.std(axis=0) / np.sqrt(len(z))
    closed = scoring.gaussian_kl(mu, logvar)
    assert np.all(np.abs(closed - monte_carlo) < 4 * stderr + 1e-3), (closed, monte_carlo, stderr)
    assert closed.min() > 0.1  # the rows are far enough from the prior for the test to mean something


def test_bernoulli_log_likelihood_is_minus_torch_bce_even_for_extreme_logits():
    logits = np.array([[-800.0, -40.0, -1.5, 0.0, 1e-9, 2.0, 40.0, 800.0]])
    x = np.array([[0.0, 1.0, 0.3, 1.0, 0.0, 1.0, 0.0, 1.0]])
    ours = scoring.feature_log_likelihood(x, {"x_logits": logits}, "bernoulli")
    bce = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.from_numpy(logits), torch.from_numpy(x), reduction="none"
    ).numpy()
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(ours, -bce, rtol=1e-12, atol=1e-12)


def test_training_loss_kl_is_the_closed_form():
    torch.manual_seed(0)
    model = build_model(ModelConfig(input_dim=6, latent_dim=3, hidden=(8,), likelihood="gaussian"))
    x = torch.randn(32, 6)
    terms = elbo_loss(model, x, None)
    with torch.no_grad():
        mu, logvar = model.encoder(x)
    expected = scoring.gaussian_kl(mu.double().numpy(), logvar.double().numpy()).mean()
    assert terms["kl"].item() == pytest.approx(expected, rel=1e-5)
    assert terms["neg_elbo"].item() == pytest.approx(terms["reconstruction"].item() + terms["kl"].item(), rel=1e-6)


def test_importance_weighted_bound_is_above_the_elbo_and_tightens_with_k(trained_vae):
    checkpoint = load_checkpoint(trained_vae)
    x_raw, _ = checkpoint.validation_rows()
    seeds = range(5)  # posterior noise is shared by rows; several seeds average it out

    def score(elbo_samples, seed, iw_samples=0):
        return scorer(checkpoint.model, checkpoint.data, elbo_samples=elbo_samples, seed=seed).score(x_raw, None, iw_samples)

    elbo = np.mean([-score(100, s).neg_elbo.mean() for s in seeds])
    bound = {
        k: np.mean([-score(1, s, k).neg_iw.mean() for s in seeds])
        for k in (1, 10, 100)
    }
    assert checkpoint.metrics["validation"]["kl"] > 1.0  # an informative posterior, so there is a gap to close
    # K = 1 is a one-sample ELBO estimate (noisy, equal in expectation); K > 1 climbs above the ELBO.
    assert bound[1] < bound[10]
    assert elbo < bound[10] < bound[100]
