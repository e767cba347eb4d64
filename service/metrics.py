"""Prometheus metrics, defined once with small fixed label sets. Dashboards and alerts use these
exact names. With several workers, prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR,
set before this module is imported) aggregates them; gauges say how.
"""

import contextvars

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

# Sub-millisecond buckets: a single-row request on loopback takes a few hundred microseconds.
SECONDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ROWS = tuple(float(2**i) for i in range(0, 15))

REQUESTS = Counter(
    "vaeserve_requests", "RPCs answered (each message of a stream counts), by method, model, version and status code",
    ["method", "model", "version", "code"],
)
REQUEST_LATENCY = Histogram(
    "vaeserve_request_latency_seconds", "RPC time in the handler", ["method", "model", "version"], buckets=SECONDS
)
# The version that answered the call running in this context: set when a call takes its version
# (ServedModel.in_use), read when the call is counted; "" for calls that never reached a version.
SERVED_VERSION: contextvars.ContextVar[str] = contextvars.ContextVar("served_version", default="")

# Anomaly scores, per model and version, for the operator: how many rows are flagged, and where scores
# fall against the model's calibration. A row's level is the smallest calibration quantile level whose
# anomaly score (the score the manifest's thresholds apply to: combined, or -ELBO) it does not exceed (1 above
# them all): vaeserve_anomaly_score_bucket{le="0.99"} counts the rows at or below the 99th percentile of the
# held-out calibration scores, so on data like the calibration rows, 1 - bucket{le="0.99"} / count is 0.01,
# whatever thresholds the requests applied.
QUANTILE_LEVELS = (0.95, 0.99, 0.999)  # export.calibrate.QUANTILES (a test checks)
SCORED_ROWS = Counter("vaeserve_scored_rows", "rows scored (Score, ScoreStream, ModelInfer)", ["model", "version"])
ANOMALOUS_ROWS = Counter(
    "vaeserve_anomalous_rows", "rows answered is_anomaly (anomaly score above the threshold applied)",
    ["model", "version"],
)
ANOMALY_SCORE = Histogram(
    "vaeserve_anomaly_score", "rows by the calibration quantile level their anomaly score reaches (le: quantile level)",
    ["model", "version"], buckets=QUANTILE_LEVELS,
)
EXPECTED_ANOMALY_RATE = Gauge(
    "vaeserve_expected_anomaly_rate", "share of rows like the calibration rows flagged at the default threshold "
    "(the false-positive rate it holds, k/(n+1) of n calibration rows)", ["model", "version"], multiprocess_mode="livemax",
)
QUEUE_WAIT = Histogram(
    "vaeserve_queue_wait_seconds", "time a request waited in a graph's batcher queue", ["model", "graph"],
    buckets=SECONDS,
)
COMPUTE = Histogram(
    "vaeserve_compute_seconds", "ONNX Runtime time per batch", ["model", "graph"], buckets=SECONDS
)
BATCH_ROWS = Histogram("vaeserve_batch_rows", "rows per graph run", ["model", "graph"], buckets=ROWS)
PENDING = Gauge(
    "vaeserve_pending_requests", "requests queued or computing in a graph's batcher", ["model", "graph"],
    multiprocess_mode="livesum",
)
OPEN_STREAMS = Gauge(
    "vaeserve_open_streams", "streams open (ScoreStream, ModelStreamInfer)", multiprocess_mode="livesum"
)
MODEL_INFO = Gauge(
    "vaeserve_model_info", "1 per served graph, with its version and granted execution provider",
    ["model", "version", "graph", "provider"], multiprocess_mode="livemax",
)
MODEL_LOADS = Counter(
    "vaeserve_model_loads", "model version loads (at start and on reload), by model and result: loaded or failed",
    ["model", "result"],
)
UNAUTHENTICATED = Counter("vaeserve_unauthenticated", "RPCs refused for a missing or unknown bearer token")
REJECTED = Counter(
    "vaeserve_rejected", "calls answered before any compute, by reason: overloaded (RESOURCE_EXHAUSTED), "
    "expired (deadline passed before the call was computed), draining (UNAVAILABLE)", ["reason"],
)


def observe_levels(histogram_child, levels: np.ndarray) -> None:
    """Observe many values of a histogram child at once: one increment per bucket instead of one observe()
    per row (a 4096-row request). Uses prometheus_client's histogram internals (_upper_bounds, _buckets,
    _sum), pinned in constraints.txt; tests/service/test_metrics.py checks it against observe()."""
    bounds = histogram_child._upper_bounds
    counts = np.bincount(np.searchsorted(bounds, levels, side="left"), minlength=len(bounds))
    for bucket, count in zip(histogram_child._buckets, counts):
        if count:
            bucket.inc(int(count))
    histogram_child._sum.inc(float(np.sum(levels)))
