"""Prometheus metrics, defined once with small fixed label sets. Dashboards and alerts use these
exact names. With several workers, prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR,
set before this module is imported) aggregates them; gauges say how.
"""

from prometheus_client import Counter, Gauge, Histogram

# Sub-millisecond buckets: a single-row request on loopback takes a few hundred microseconds.
SECONDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ROWS = tuple(float(2**i) for i in range(0, 15))

REQUESTS = Counter(
    "vaeserve_requests", "RPCs answered, by method, model and status code", ["method", "model", "code"]
)
REQUEST_LATENCY = Histogram(
    "vaeserve_request_latency_seconds", "RPC time in the handler", ["method", "model"], buckets=SECONDS
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
