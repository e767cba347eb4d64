"""Anomaly thresholds, calibrated on held-out normal rows scored through the exported graphs.

The rows go through the version's Scorer (vaeserve.scoring) on its ONNX Runtime sessions, exactly as the
service scores a request, with the same sample counts and seed: -ELBO as a Score without K (the score
graph, where the version has one), the K-sample bound as a Score with K; so a threshold applies to the
scores the service returns. A CVAE is scored label-free with its class prior (log p(x) ~ log sum_y p(y) p(x|y)),
because at serve time a request's labels are optional and an anomalous row may carry no trustworthy label.
"""

import numpy as np

from vaeserve import scoring
from vaeserve.artifact.manifest import Thresholds
from vaeserve.errors import ExportError

QUANTILES = (0.95, 0.99, 0.999)
TARGET_FALSE_POSITIVE_RATE = 0.01  # the default threshold is the 99th percentile of -ELBO
DEFAULT_SCORE = "neg_elbo"
MAX_ROWS = 2000  # more held-out rows than this are subsampled (seeded): calibration stays seconds


def calibrate(x_raw: np.ndarray, scorer: scoring.Scorer, iw_samples: int = scoring.IW_SAMPLES,
              max_rows: int = MAX_ROWS) -> Thresholds:  # fmt: skip
    """The manifest's thresholds for raw held-out rows x_raw [rows, features]."""
    if x_raw.shape[0] > max_rows:
        x_raw = x_raw[np.sort(np.random.default_rng(scoring.SEED).choice(x_raw.shape[0], max_rows, replace=False))]
    s = scorer.score(x_raw, None)  # as a Score without K is served: through the score graph when there is one
    iw = scorer.score(x_raw, None, iw_samples) if iw_samples else None
    scores = {"neg_elbo": s.neg_elbo} | ({} if iw is None else {"neg_iw": iw.neg_iw})
    with np.errstate(invalid="ignore"):
        quantiles = {name: {str(q): float(np.quantile(v, q)) for q in QUANTILES} for name, v in scores.items()}
    default = quantiles[DEFAULT_SCORE][str(1.0 - TARGET_FALSE_POSITIVE_RATE)]
    if not all(np.isfinite(v) for q in quantiles.values() for v in q.values()):
        broken = int(np.sum(~np.isfinite(s.neg_elbo)))
        raise ExportError(f"{broken} of {len(x_raw)} held-out rows score +inf (the graphs break down numerically on "
                          f"them): no finite thresholds at {QUANTILES}")  # fmt: skip
    return Thresholds(
        score=DEFAULT_SCORE, default=default, target_false_positive_rate=TARGET_FALSE_POSITIVE_RATE,
        quantiles=quantiles, calibration_rows=int(x_raw.shape[0]),
        calibrated_on="held-out validation rows of the checkpoint", label_free=scorer.class_prior is not None,
    )  # fmt: skip
