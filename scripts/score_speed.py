"""Scorer.score rows/s in-process: the score graph (one ONNX Runtime call per chunk) against the NumPy path
(encoder, NumPy sampling, decoder, float64 NumPy likelihood), on one model version, interleaved.

    .venv/bin/python scripts/score_speed.py MODEL_VERSION_FOLDER [--batches 1 64 256 1024] [--rounds 3] [--seconds 1]
                                            [--label-free]   (a CVAE's rows without labels; with them by default)
                                            [--cold]         (caches swept between calls, as in the server)

Rounds alternate numpy, graph, numpy, graph, ... per batch size; each round scores the same raw rows (the
checkpoint's held-out rows when the manifest's source checkpoint is readable, else rows drawn inside the
support) for about --seconds. Prints the median rows/s of each path with the min-max spread over rounds,
the ratio of medians, and the median microseconds per call spent outside ONNX Runtime's run (which
releases the GIL): Python and NumPy, what holds the GIL against the service's event loop. Only ratios
from one run are comparable. glibc's thresholds are raised first, as the server does (service/memory.py),
so both paths run in the allocator's fast state. The first line is the parity of the two paths on the rows.
"""

import argparse
import statistics
import time

import numpy as np

from vaeserve.artifact.repository import load_version
from vaeserve.artifact.runtime import Model
from vaeserve.service import memory


class TimedSession:
    """An InferenceSession whose run() adds its wall time to `inside`."""

    inside = 0.0

    def __init__(self, session):
        self.session = session

    def run(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.session.run(*args, **kwargs)
        finally:
            TimedSession.inside += time.perf_counter() - start


# --cold: bytes read between calls (outside the timing), more than this box's caches: in the server, gRPC and
# the other calls run between two batches, and a 1-row Score of the default digits model took 340 us after
# such a sweep against 170 us hot.
SWEEP_BYTES = 32 << 20


def measure(score, x: np.ndarray, seconds: float, sweep: np.ndarray | None = None) -> tuple[float, float]:
    """(rows/s, microseconds per call outside ONNX Runtime), reading `sweep` between calls when given."""
    score(x)  # warm
    calls, timed, TimedSession.inside = 0, 0.0, 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        if sweep is not None:
            sweep.sum()
        start = time.perf_counter()
        score(x)
        timed += time.perf_counter() - start
        calls += 1
    return calls * len(x) / timed, (timed - TimedSession.inside) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("version", help="a model version folder exported with a score graph")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256, 1024])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--label-free", action="store_true", help="score a CVAE's rows without labels")
    parser.add_argument("--cold", action="store_true", help="read 32 MiB between calls (not timed), as the server's other work does")
    args = parser.parse_args()
    sweep = np.ones(SWEEP_BYTES // 8) if args.cold else None

    memory.configure_allocator()
    model = Model(load_version(args.version))
    for graph in (model.encoder, model.decoder, model.score_graph, model.neighbour_graph):
        if graph is not None:
            graph.session = TimedSession(graph.session)
    scorer, m = model.scorer, model.manifest
    if not scorer.uses_graph():
        raise SystemExit(f"{args.version}: no score graph (exported before schema 3?)")
    rng = np.random.default_rng(0)
    raw = rng.uniform(m.support.low, m.support.high, (1024, m.input.features)).astype(np.float32)
    try:
        from vaeserve.training.checkpoint import load_checkpoint

        raw = load_checkpoint(m.source_checkpoint["path"]).validation_rows()[0].astype(np.float32)
        source = "held-out rows of " + m.source_checkpoint["path"]
    except Exception:  # no torch or no checkpoint here: rows inside the support
        source = "uniform rows inside the support"
    labels = np.eye(len(m.labels), dtype=np.float32)[np.arange(len(raw)) % len(m.labels)] if m.conditional and not args.label_free else None

    print(f"{m.name} v{m.version}: {m.model.kind} {m.scoring.likelihood}, {m.input.features} features, "
          f"latent {m.model.latent_dim}, {m.scoring.elbo_samples} ELBO samples{', label-free' if args.label_free else ''}"
          f"{', caches swept between calls' if args.cold else ''}; {source}; "
          f"providers {model.encoder.providers}")  # fmt: skip
    _, relative = scorer.score(raw, labels).differences(scorer.score(raw, labels, reference=True))
    print(f"parity on {len(raw)} rows, max |graph - numpy| / (1 + |numpy|): "
          + ", ".join(f"{name} {diff:.1e}" for name, diff in relative.items()))  # fmt: skip
    print(f"{'batch':>6} {'numpy rows/s (min-max)':>28} {'graph rows/s (min-max)':>28} {'graph/numpy':>12} "
          f"{'us/call outside ORT: numpy':>27} {'graph':>6}")  # fmt: skip
    for batch in args.batches:
        index = np.arange(batch) % len(raw)
        x, y = raw[index], None if labels is None else labels[index]
        paths = {"numpy": lambda rows: scorer.score(rows, y, reference=True), "graph": lambda rows: scorer.score(rows, y)}
        measured, outside = {name: [] for name in paths}, {name: [] for name in paths}
        for _ in range(args.rounds):
            for name, score in paths.items():
                rate, python = measure(score, x, args.seconds, sweep)
                measured[name].append(rate)
                outside[name].append(python)
        cells = [f"{statistics.median(v):>10,.0f} ({min(v):,.0f}-{max(v):,.0f})" for v in measured.values()]
        ratio = statistics.median(measured["graph"]) / statistics.median(measured["numpy"])
        held = [statistics.median(v) for v in outside.values()]
        print(f"{batch:>6} {cells[0]:>28} {cells[1]:>28} {ratio:>11.2f}x {held[0]:>27,.0f} {held[1]:>6,.0f}")


if __name__ == "__main__":
    main()
