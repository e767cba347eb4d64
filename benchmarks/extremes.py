"""`vaeserve bench extremes`: can an out-of-range row slip past the anomaly detector?

Serves a repository (a `vaeserve serve` subprocess) and, for every model, takes rows inside its support
(--rows FILE of real rows, clipped into the support; without it, rows drawn uniformly inside the
support, which may be anomalous already) and, one feature at a time, sets that feature
to +-1e6, +-1e38, or one float32 step past the training range at either end. Every such row is sent to
Score over gRPC, label-free for a CVAE, with per-feature scores. Reported per model and perturbation:
how many rows were flagged at the default threshold, how many scores were NaN, how many anomaly scores
were below the same row brought back into the support (the changed value moved to the nearest end of its
interval), how many had their support distance exactly at the changed feature, and the median anomaly
score. A failure: a far value (+-1e6, +-1e38) not flagged, a NaN, a score below the row brought back, a
distance elsewhere. A value one step past the range is flagged only as its score says (its penalty is
next to nothing), so that the calibrated false-positive rate holds for normal rows just outside it.
"""

from pathlib import Path

import numpy as np

PERTURBATIONS = ("+1e6", "-1e6", "+1e38", "-1e38", "just above", "just below")
FAR = ("+1e6", "-1e6", "+1e38", "-1e38")  # must be flagged
# Relative: a value one float32 step outside moves the neighbour graph's float32 distance by rounding only,
# either way (its penalty, ~1e-11 nats, is below it).
ROUNDING = 1e-5
REQUEST_ROWS = 512


def perturbed(base: np.ndarray, low: np.ndarray, high: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Every base row with one feature changed: ([rows * features, features], index of the feature changed)."""
    rows, features = base.shape
    x = np.repeat(base, features, axis=0)
    feature = np.tile(np.arange(features), rows)
    at = np.arange(len(x)), feature
    if kind == "just above":
        x[at] = np.nextafter(high[feature], np.float32(np.inf))
    elif kind == "just below":
        x[at] = np.nextafter(low[feature], np.float32(-np.inf))
    else:
        x[at] = np.float32(float(kind))
    return x, feature


def run(args) -> int:
    from vaeserve.artifact.repository import newest, scan_repository
    from vaeserve.benchmarks.harness import start_server
    from vaeserve.errors import ConfigError
    from vaeserve.service.client import Client
    from vaeserve.service.rows import read_rows

    found = scan_repository(args.repository)
    names = args.model.split(",") if args.model else sorted(found)
    missing = [n for n in names if n not in found]
    if missing:
        raise ConfigError(f"no valid version of {', '.join(missing)} under {args.repository}")
    server = start_server(args.repository)
    failures = 0
    try:
        server.wait_serving()
        with Client(server.target, timeout=120) as client:
            print(f"{'model':<14} {'perturbation':<12} {'rows':>6} {'flagged':>8} {'NaN':>5} {'< inside':>9} "
                  f"{'outside at it':>14} {'median score':>13}")  # fmt: skip
            for name in names:
                m = newest(found[name]).manifest
                low, high = m.support.low, m.support.high
                if args.rows:
                    rows = read_rows(Path(args.rows), m.input.feature_names).x  # columns by name, as the client reads them
                    base = np.clip(rows[: args.base_rows], low, high)  # rows inside the support
                else:
                    rng = np.random.default_rng(0)
                    base = (low + rng.random((args.base_rows, len(low))) * (high - low)).astype(np.float32)
                flagged = client.score(name, base).is_anomaly
                print(f"{name:<14} {'(none)':<12} {len(base):>6} {int(flagged.sum()):>8}   <- the rows inside the support")
                for kind in PERTURBATIONS:
                    x, feature = perturbed(base, low, high, kind)
                    parts = [client.score(name, x[i : i + REQUEST_ROWS], per_feature=True) for i in range(0, len(x), REQUEST_ROWS)]
                    score = np.concatenate([p.anomaly_score for p in parts])
                    back = np.clip(x, low, high)
                    inside = np.concatenate([client.score(name, back[i : i + REQUEST_ROWS]).anomaly_score
                                             for i in range(0, len(x), REQUEST_ROWS)])  # fmt: skip
                    flagged = np.concatenate([p.is_anomaly for p in parts])
                    distance = np.concatenate([p.support_distance for p in parts])
                    at_feature = (distance[np.arange(len(x)), feature] > 0) & ((distance > 0).sum(axis=1) == 1)
                    below = np.sum(score < inside - ROUNDING * (1 + np.abs(inside)))
                    nan = int(np.isnan(score).sum())
                    failures += (int((~flagged).sum()) if kind in FAR else 0) + nan + int(below)
                    failures += int((~at_feature).sum())
                    print(f"{name:<14} {kind:<12} {len(x):>6} {int(flagged.sum()):>8} {nan:>5} {int(below):>9} "
                          f"{int(at_feature.sum()):>14} {np.median(score):>13.4g}")  # fmt: skip
    finally:
        server.stop()
    print("every far value flagged, none NaN, none below its row inside the support, each outside exactly at "
          "its changed feature" if failures == 0 else f"{failures} failures (see the table)")  # fmt: skip
    return 0 if failures == 0 else 1
