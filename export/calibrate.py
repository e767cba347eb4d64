"""Anomaly thresholds, calibrated on held-out normal rows scored through the exported graphs.

The rows are the checkpoint's calibration rows: they neither trained the model nor chose its epoch, so
the conformal threshold (vaeserve.conformal) holds its false-positive rate on new normal rows. They go
through the version's Scorer (vaeserve.scoring) on its ONNX Runtime sessions, exactly as the service
scores a request, with the same sample counts and seed: the anomaly score (the combined score, or -ELBO
for a version without one) as a Score without K, the K-sample bound as a Score with K; so a threshold
applies to the scores the service returns. A CVAE is scored label-free with its class prior
(log p(x) ~ log sum_y p(y) p(x|y)), because at serve time a request's labels are optional and an anomalous
row may carry no trustworthy label.
"""

import logging

import numpy as np

from vaeserve import scoring
from vaeserve.artifact.manifest import Thresholds
from vaeserve.conformal import Calibration
from vaeserve.errors import ExportError

log = logging.getLogger(__name__)

QUANTILES = (0.95, 0.99, 0.999)
TARGET_FALSE_POSITIVE_RATE = 0.01  # the default threshold flags rows with a p-value of at most this
MAX_ROWS = 2000  # more calibration rows than this are subsampled (seeded): calibration stays seconds


def calibrate(x_raw: np.ndarray, scorer: scoring.Scorer, iw_samples: int = scoring.IW_SAMPLES,
              max_rows: int = MAX_ROWS, target: float = TARGET_FALSE_POSITIVE_RATE,
              calibrated_on: str = "calibration rows held out of training and early stopping") -> Thresholds:  # fmt: skip
    """The manifest's thresholds for raw calibration rows x_raw [rows, features]: the default threshold is
    the conformal one for `target`, or, when the rows cannot reach it (n < 1/target - 1), the largest
    calibration score (rate 1/(n+1)), with a warning."""
    if x_raw.shape[0] > max_rows:
        x_raw = x_raw[np.sort(np.random.default_rng(scoring.SEED).choice(x_raw.shape[0], max_rows, replace=False))]
    s = scorer.score(x_raw, None)  # as a Score without K is served: through the score graph when there is one
    iw = scorer.score(x_raw, None, iw_samples) if iw_samples else None
    name = "neg_elbo" if scorer.combination is None else "combined"
    scores = {name: s.anomaly_score, "neg_elbo": s.neg_elbo} | ({} if iw is None else {"neg_iw": iw.neg_iw})
    with np.errstate(invalid="ignore"):
        quantiles = {score: {str(q): float(np.quantile(v, q)) for q in QUANTILES} for score, v in scores.items()}
    if not all(np.isfinite(v) for q in quantiles.values() for v in q.values()) or not np.isfinite(s.anomaly_score).all():
        broken = int(np.sum(~np.isfinite(s.anomaly_score)))
        raise ExportError(f"{broken} of {len(x_raw)} calibration rows score +inf (the graphs break down numerically on "
                          f"them): no finite thresholds")  # fmt: skip
    calibration = Calibration.of(s.anomaly_score)
    if calibration.reachable(target):
        default, promised = calibration.threshold(target), calibration.rate(target)
    else:
        default, promised = float(calibration.scores[-1]), calibration.smallest_rate
        log.warning("the false-positive target %g is out of reach of %d calibration rows (it needs %d): the default "
                    "threshold flags scores above them all, a rate of %.4g; train on more rows to reach it",
                    target, calibration.rows, int(np.ceil(1 / target - 1)), promised)  # fmt: skip
    return Thresholds(
        score=name, default=default, target_false_positive_rate=target, quantiles=quantiles,
        calibration_rows=calibration.rows, calibrated_on=calibrated_on, label_free=scorer.class_prior is not None,
        promised_false_positive_rate=promised, smallest_false_positive_rate=calibration.smallest_rate,
        calibration_scores=tuple(float(v) for v in calibration.scores),
    )  # fmt: skip
