"""Anomaly thresholds, calibrated on held-out normal rows scored through the exported graphs.

The rows go through ONNX Runtime and vaeserve.scoring exactly as the service scores a request, with
the same sample counts and seed, so a threshold applies to the scores the service returns. A CVAE
is scored label-free with its class prior (log p(x) ~ log sum_y p(y) p(x|y)), because at serve time
a request's labels are optional and an anomalous row may carry no trustworthy label.
"""

import numpy as np

from vaeserve import scoring
from vaeserve.service.runtime import Graph, scoring_callables

QUANTILES = (0.95, 0.99, 0.999)
TARGET_FALSE_POSITIVE_RATE = 0.01  # the default threshold is the 99th percentile of -ELBO
DEFAULT_SCORE = "neg_elbo"
MAX_ROWS = 2000  # more held-out rows than this are subsampled (seeded): calibration stays seconds
CHUNK_VALUES = 1 << 24  # decoder output values held at once; rows are scored in chunks below this


def calibrate(x: np.ndarray, encoder: Graph, decoder: Graph, likelihood: str,
              class_prior: list[float] | None = None, max_rows: int = MAX_ROWS) -> dict:
    """The manifest's `thresholds` section for normalised held-out rows x [rows, features]."""
    if x.shape[0] > max_rows:
        x = x[np.sort(np.random.default_rng(scoring.SEED).choice(x.shape[0], max_rows, replace=False))]
    encode, decode = scoring_callables(encoder, decoder)
    classes = 1 if class_prior is None else len(class_prior)
    samples = scoring.ELBO_SAMPLES + scoring.IW_SAMPLES
    chunk = max(1, CHUNK_VALUES // (classes * samples * x.shape[1]))
    neg_elbo, neg_iw = [], []
    for start in range(0, x.shape[0], chunk):
        s = scoring.score(
            x[start : start + chunk], encode, decode, likelihood,
            class_prior=None if class_prior is None else np.asarray(class_prior),
            elbo_samples=scoring.ELBO_SAMPLES, iw_samples=scoring.IW_SAMPLES, seed=scoring.SEED,
        )
        neg_elbo.append(s.neg_elbo)
        neg_iw.append(s.neg_iw)
    scores = {"neg_elbo": np.concatenate(neg_elbo), "neg_iw": np.concatenate(neg_iw)}
    quantiles = {name: {str(q): float(np.quantile(v, q)) for q in QUANTILES} for name, v in scores.items()}
    return {
        "score": DEFAULT_SCORE,
        "default": quantiles[DEFAULT_SCORE][str(1.0 - TARGET_FALSE_POSITIVE_RATE)],
        "target_false_positive_rate": TARGET_FALSE_POSITIVE_RATE,
        "quantiles": quantiles,
        "elbo_samples": scoring.ELBO_SAMPLES,
        "iw_samples": scoring.IW_SAMPLES,
        "seed": scoring.SEED,
        "calibration_rows": int(x.shape[0]),
        "calibrated_on": "held-out validation rows of the checkpoint",
        "label_free": class_prior is not None,
    }
