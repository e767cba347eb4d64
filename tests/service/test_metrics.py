"""The operator's metrics: rows scored and flagged and the calibration-level histogram, per model and
version, equal to what was sent and answered; the version label on request metrics."""

import numpy as np
from prometheus_client import CollectorRegistry, Histogram

from vaeserve.export.calibrate import QUANTILES
from vaeserve.service import metrics


def test_observe_levels_is_observe_per_value():
    """The bulk observe uses prometheus_client internals: it must equal one observe() per value."""
    registry = CollectorRegistry()
    one = Histogram("one", "", ["m"], buckets=metrics.QUANTILE_LEVELS, registry=registry).labels("a")
    bulk = Histogram("bulk", "", ["m"], buckets=metrics.QUANTILE_LEVELS, registry=registry).labels("a")
    levels = np.random.default_rng(0).choice([*metrics.QUANTILE_LEVELS, 1.0], 500)
    for level in levels:
        one.observe(level)
    metrics.observe_levels(bulk, levels)
    samples = {family.name: [(s.name.split("_", 1)[1], s.labels.get("le"), s.value) for s in family.samples
                             if not s.name.endswith("_created")] for family in registry.collect()}  # fmt: skip
    exact = lambda rows: [r for r in rows if r[0] != "sum"]  # noqa: E731
    assert exact(samples["one"]) == exact(samples["bulk"]) and len(exact(samples["one"])) == 5  # 4 buckets, count
    sums = [[r[2] for r in rows if r[0] == "sum"] for rows in (samples["one"], samples["bulk"])]
    assert np.allclose(*sums, rtol=1e-12)


def test_histogram_levels_are_the_calibration_quantiles():
    assert metrics.QUANTILE_LEVELS == QUANTILES


def anomaly_metrics(server, model: str) -> dict:
    """{name or (name, le): value} of one model version's anomaly metrics."""
    out = {}
    for (name, labels), value in server.metrics().items():
        labels = dict(labels)
        if labels.get("model") != model or labels.get("version") != "1":
            continue
        if name.startswith(("vaeserve_scored_rows_total", "vaeserve_anomalous_rows_total", "vaeserve_expected_anomaly_rate")):
            out[name] = value
        elif name.startswith("vaeserve_anomaly_score"):
            out[name if "le" not in labels else (name, labels["le"])] = value
    return out


def test_anomaly_counters_equal_the_rows_sent_and_flagged(server, client, rows):
    x, _ = rows
    x = np.concatenate([x, x[:4] + 3.0])  # a few rows pushed out of the support
    x[-1, 0] = 1e4  # one far outside: flagged through its penalty
    meta = client.get_model("ppca")
    before = anomaly_metrics(server, "ppca")
    answers = [client.score("ppca", x), client.score("ppca", x, threshold=0.0), client.score("ppca", x[:5])]
    after = anomaly_metrics(server, "ppca")
    delta = {key: value - before.get(key, 0.0) for key, value in after.items()}

    sent = sum(len(a.neg_elbo) for a in answers)
    assert delta["vaeserve_scored_rows_total"] == sent
    assert delta["vaeserve_anomalous_rows_total"] == sum(int(a.is_anomaly.sum()) for a in answers)
    assert answers[0].is_anomaly[-1] and answers[0].threshold == meta.threshold
    # The rate the default threshold holds: k/(n+1) of the n calibration rows, at most the target.
    assert after["vaeserve_expected_anomaly_rate"] == meta.calibration.promised_false_positive_rate <= 0.01
    # Each row in the bucket of the first calibration quantile of its anomaly score that it does not exceed.
    quantiles = meta.quantiles[meta.threshold_score]
    scores = np.concatenate([a.anomaly_score for a in answers])
    for level in QUANTILES:
        expected = int(np.sum(scores <= quantiles[str(level)]))
        assert delta[("vaeserve_anomaly_score_bucket", str(level))] == expected, level
    assert delta[("vaeserve_anomaly_score_bucket", "+Inf")] == delta["vaeserve_anomaly_score_count"] == sent
    assert delta[("vaeserve_anomaly_score_bucket", "+Inf")] > delta[("vaeserve_anomaly_score_bucket", "0.999")]  # the pushed rows


def test_request_metrics_carry_the_version_that_answered(server, client, rows):
    x, _ = rows

    def count(version: str, code: str = "OK") -> float:
        key = ("vaeserve_requests_total", (("code", code), ("method", "Reconstruct"), ("model", "vae"), ("version", version)))
        return server.metrics().get(key, 0.0)

    before = {version: count(version) for version in ("1", "")}
    client.reconstruct("vae", x)
    client.reconstruct("vae", x, version=1)
    try:
        client.reconstruct("vae", x, version=7)  # no such version: counted, under no version
    except Exception:
        pass
    assert count("1") == before["1"] + 2
    assert count("", "NOT_FOUND") >= 1
