"""Check exported graphs against the torch modules they came from, in ONNX Runtime, on real rows, and the
score graph against the NumPy scorer on the encoder and decoder graphs.

Every graph goes through the same check; every mismatch is collected and reported in one error that
names the output and its max absolute difference.
"""

import itertools

import numpy as np
import torch

from vaeserve.artifact.manifest import ScoreParity
from vaeserve.errors import ExportError
from vaeserve.artifact.runtime import Graph
from vaeserve.scoring import Scorer, neighbour_distance
from vaeserve.export.graphs import GraphSpec

BATCH_SIZES = (1, 7, 256)
TOLERANCE = 1e-4  # max absolute difference, fp32


def parity_batches(
    x: np.ndarray, labels: np.ndarray | None, encoder: torch.nn.Module, batch_sizes=BATCH_SIZES, seed: int = 0
) -> list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """(encoder feeds, decoder feeds) per batch size, from normalised rows x and one-hot labels.

    Rows repeat when there are fewer than the batch size. The decoder gets latents the encoder
    produces for those rows (a posterior sample), so both graphs see the values they see in service.
    """
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for size in batch_sizes:
        index = np.arange(size) % x.shape[0]
        enc = {"x": x[index].astype(np.float32)}
        if labels is not None:
            enc["y"] = labels[index].astype(np.float32)
        with torch.no_grad():
            mu, logvar = encoder(*(torch.from_numpy(v) for v in enc.values()))
            z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=generator)
        dec = {"z": z.numpy()}
        if labels is not None:
            dec["y"] = enc["y"]
        batches.append((enc, dec))
    return batches


def max_abs_diff(module: torch.nn.Module, graph: Graph, spec: GraphSpec,
                 feeds_by_batch: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Max |ORT - torch| of each output over all batches, keyed `graph.output` (e.g. `encoder.mu`).
    The graph's declared inputs and outputs were checked against the contract when it was opened."""
    worst = {f"{spec.name}.{name}": 0.0 for name in spec.output_names}
    for feeds in feeds_by_batch:
        with torch.no_grad():
            expected = module(*(torch.from_numpy(feeds[name]) for name in spec.input_names))
        got = graph.run(feeds)
        for name, want in zip(spec.output_names, expected):
            key, have, want = f"{spec.name}.{name}", got[name], want.numpy()
            if have.shape != want.shape:
                raise ExportError(f"{key}: ONNX Runtime returned shape {have.shape}, torch {want.shape}")
            diff = float(np.max(np.abs(have.astype(np.float64) - want.astype(np.float64))))
            worst[key] = diff if not diff <= worst[key] else worst[key]  # NaN sticks
    return worst


def check_parity(diffs: dict[str, float], tolerance: float = TOLERANCE) -> None:
    """Raise one ExportError listing every output whose max difference exceeds the tolerance."""
    failed = [(key, diff) for key, diff in diffs.items() if not diff <= tolerance]
    if failed:
        listed = ", ".join(f"{key} max abs diff {diff:.3g}" for key, diff in failed)
        raise ExportError(f"ONNX Runtime disagrees with torch beyond tolerance {tolerance:g}: {listed}")


# The score graph against the NumPy scorer: relative, because scores are sums over features and samples
# whose size grows with the model (and without bound on anomalous rows); float32 likelihood terms summed
# in float64 land near 1e-8 on the digits models.
SCORE_TOLERANCE = 1e-5  # |graph - numpy| <= SCORE_TOLERANCE * (1 + |numpy|)
SCORE_OUTPUTS = ("neg_elbo", "reconstruction", "kl", "per_feature")


def score_parity(scorer: Scorer, raw: np.ndarray, labels: np.ndarray | None, batch_sizes=BATCH_SIZES,
                 tolerance: float = SCORE_TOLERANCE) -> ScoreParity:  # fmt: skip
    """The score graph of `scorer` against its NumPy path on raw held-out rows (a CVAE's both with their
    one-hot labels and label-free): all rows in one call, and the first rows, repeated to fill it, at each
    batch size. Raises one ExportError naming every output beyond the tolerance."""
    if not scorer.uses_graph():
        raise ValueError("score_parity needs a Scorer with a score graph")
    absolute, relative = dict.fromkeys(SCORE_OUTPUTS, 0.0), dict.fromkeys(SCORE_OUTPUTS, 0.0)
    for size, labelled in itertools.product((None, *batch_sizes), (True, False) if labels is not None else (False,)):
        index = np.arange(len(raw) if size is None else size) % len(raw)
        y = labels[index] if labelled else None
        got, want = scorer.score(raw[index], y), scorer.score(raw[index], y, reference=True)
        for worst, diffs in zip((absolute, relative), got.differences(want)):
            for name in SCORE_OUTPUTS:
                worst[name] = diffs[name] if not diffs[name] <= worst[name] else worst[name]  # NaN sticks
    failed = [(name, absolute[name], relative[name]) for name in SCORE_OUTPUTS if not relative[name] <= tolerance]
    if failed:
        listed = ", ".join(f"score.{name} max abs diff {a:.3g} (relative {r:.3g})" for name, a, r in failed)
        raise ExportError(f"the score graph disagrees with the NumPy scorer beyond relative tolerance {tolerance:g}: {listed}")
    return ScoreParity(tuple(batch_sizes), len(raw), tolerance, absolute, relative)


# The neighbour graph computes squared distances in float32 as |x|^2 - 2 x.r + |r|^2 (centred on the
# reference rows' mean): near a reference row the terms cancel, to float32 rounding of the sum over features
# of |x|^2 (at most features x 6e-8 of it, typically sqrt(features) x 6e-8). So the difference is measured
# against 1 + |numpy| + |x - centre|^2.
NEIGHBOUR_TOLERANCE = 1e-4


def neighbour_parity(knn, rows: np.ndarray, reference: np.ndarray, k: int, batch_sizes=BATCH_SIZES,
                     tolerance: float = NEIGHBOUR_TOLERANCE) -> ScoreParity:  # fmt: skip
    """The neighbour graph `knn` (normalised rows -> [rows] distances) against scoring.neighbour_distance in
    float64 on normalised held-out rows: all in one call and at each batch size; ExportError beyond tolerance
    (of 1 + distance + the row's squared norm about the reference mean)."""
    absolute = relative = 0.0
    centre = np.asarray(reference, np.float64).mean(axis=0)
    for size in (None, *batch_sizes):
        x = rows[np.arange(len(rows) if size is None else size) % len(rows)]
        got, want = np.asarray(knn(x), np.float64).reshape(-1), neighbour_distance(x, reference, k)
        diff = np.abs(got - want)
        scale = 1 + want + ((x - centre) ** 2).sum(axis=1)
        absolute, relative = max(absolute, float(diff.max())), max(relative, float((diff / scale).max()))
    if not relative <= tolerance:
        raise ExportError(f"the neighbour graph disagrees with the NumPy distances beyond relative tolerance {tolerance:g}: "
                          f"max abs diff {absolute:.3g} (relative {relative:.3g})")  # fmt: skip
    return ScoreParity(tuple(batch_sizes), len(rows), tolerance, {"knn": absolute}, {"knn": relative})
