"""Scores of rows under a VAE: -ELBO, its reconstruction and KL terms, the K-sample importance-weighted
bound, and per-feature terms. NumPy only, because the service carries no torch.

`Scorer` is the one Score of a model: raw rows in, support and normalisation applied, scored in chunks
that bound memory, never NaN. The service (inside one batch of Score requests), export calibration, the
benchmarks, `vaeserve evaluate` and the tests' references all score through it. The encoder and decoder
come in as callables, so the same code runs on ONNX Runtime sessions and on a torch model.

Everything is in nats, in the model's normalised feature space, float64. Posterior noise comes from a
seeded generator and is shared by every row, so a row's score does not depend on which other rows share
its batch or chunk.

A model version exported with a score graph (vaeserve.export.graphs.build_score_graph: encoder, sampling
with the same noise, decoder and likelihood in one ONNX Runtime call, float64 sums) hands it to the Scorer,
which runs it in place of the NumPy path whenever no importance-weighted bound is asked for: one call that
releases the GIL instead of two and float64 NumPy that holds it. Label-free CVAE rows go through it tiled
over the classes; only the sum over classes (small: no posterior-sample axis) stays in NumPy. The NumPy path stays the reference (export checks the
graph against it, `vaeserve evaluate` and the tests use it) and scores what the graph does not: the
importance-weighted bound.
"""

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np

from vaeserve.conformal import Calibration
from vaeserve.normalization import Normalizer, Support

LIKELIHOODS = ("gaussian", "gaussian-fixed", "bernoulli")
LOG_2PI = float(np.log(2.0 * np.pi))

# Defaults shared by threshold calibration at export and the service, so a manifest's thresholds
# apply to the scores the service computes. The manifest records the values it was calibrated with.
# Posterior samples for the reconstruction term of the ELBO. By evidence: `vaeserve bench anomaly --seeds 3
# --export-option elbo_samples=K`, 15 ADBench sets: mean AUROC / AUPRC 93.71 / 75.91 at K = 1, 93.67 / 75.82
# at 2, 93.66 / 75.75 at 4, 93.64 / 75.69 at 8 (per set within 0.6 points of 8 at 2). Ranking does not gain
# from more samples and Score's work grows with them; 2 rather than 1 because one sample's float32 score
# graph missed its parity on one set (the version then scores on the slower NumPy path). Per version:
# `vaeserve export --elbo-samples K`.
ELBO_SAMPLES = 2
IW_SAMPLES = 64  # K of the importance-weighted bound when a caller asks for it
SEED = 0  # seed of the posterior noise

Encode = Callable[[np.ndarray, np.ndarray | None], tuple[np.ndarray, np.ndarray]]
Decode = Callable[[np.ndarray, np.ndarray | None], dict[str, np.ndarray]]
# score graph(normalised x, one-hot labels or None) -> Scores without neg_iw: `score` with iw_samples=0
ScoreGraph = Callable[[np.ndarray, np.ndarray | None], "Scores"]
# neighbour graph(neighbour_input(x)) -> [rows] float64 mean squared distance to the k nearest reference rows
Neighbours = Callable[[np.ndarray], np.ndarray]

# The default anomaly score's second opinion: the squared distance to the nearest reference row (the
# training and validation rows), by evidence on the 15 ADBench sets x 5 seeds (docs/anomaly.md, mean AUROC /
# AUPRC): -ELBO alone 93.3 / 74.9; kNN alone 93.7 / 78.9 at k = 1, 93.5 / 78.3 at 5; -ELBO + kNN, each
# standardised: 94.1 / 78.3 (distance to the nearest training row, support-clipped), 94.3 / 79.1 (nearest of
# training and validation rows, unclipped), 94.45 / 79.8 (its square), 94.5 / 80.2 (the square weighted 2;
# k = 2: 94.4 / 79.8; cubes: 94.6 / 80.3).
NEIGHBOURS_K = 1  # knn is the mean of the k nearest squared distances
COMBINED_PARTS = ("neg_elbo", "knn")
COMBINED_WEIGHTS = (1.0, 2.0)  # of -ELBO and knn, each standardised
KNN_CLIP = 1e4  # neighbour inputs are clipped to +-this (normaliser units): squares stay finite in float32
# Rows kept as the kNN reference (a seeded subsample beyond): at most MAX_REFERENCE_ROWS, and at most
# MAX_NEIGHBOUR_WORK / features, so the neighbour graph's multiply-adds per scored row stay below the
# model's own for wide rows (a 784-512-256-32 MLP VAE: ~1.6M at 2 ELBO samples). Measured in process, one
# thread, a 256-row Score: Fashion-MNIST 10.5 ms without the graph, 73 ms with 4096 reference rows, 22-25 ms
# with the 1337 of this budget; digits (64 features, 1438 rows) 0.8 and 1.4 ms.
MAX_REFERENCE_ROWS = 4096
MAX_NEIGHBOUR_WORK = 1 << 20


def reference_budget(features: int) -> int:
    """How many reference rows the neighbour graph holds for rows of `features` values."""
    return max(1, min(MAX_REFERENCE_ROWS, MAX_NEIGHBOUR_WORK // max(1, features)))


def decoder_outputs(likelihood: str) -> tuple[str, ...]:
    """Names of the decoder's outputs: the parameters of p(x|z)."""
    if likelihood == "bernoulli":
        return ("x_logits",)
    if likelihood in ("gaussian", "gaussian-fixed"):
        return ("x_mean", "x_logvar")
    raise ValueError(f"unknown likelihood {likelihood!r}; expected one of {LIKELIHOODS}")


def gaussian_kl(mu: np.ndarray, logvar: np.ndarray) -> np.ndarray:
    """KL(N(mu, diag exp(logvar)) || N(0, I)) per row, closed form (Kingma & Welling 2014, appendix B)."""
    return 0.5 * np.sum(mu**2 + np.exp(logvar) - logvar - 1.0, axis=-1)


def log_normal(x: np.ndarray, mean: np.ndarray, logvar: np.ndarray) -> np.ndarray:
    """Elementwise log N(x | mean, exp(logvar))."""
    return -0.5 * (LOG_2PI + logvar + (x - mean) ** 2 * np.exp(-logvar))


def softplus(a: np.ndarray) -> np.ndarray:
    """log(1 + exp(a)), stable for large |a|; a third of np.logaddexp(0, a)'s time."""
    return np.maximum(a, 0.0) + np.log1p(np.exp(-np.abs(a)))


def feature_log_likelihood(x: np.ndarray, params: dict[str, np.ndarray], likelihood: str) -> np.ndarray:
    """log p(x_d | z) for every feature d."""
    if likelihood == "bernoulli":
        logits = params["x_logits"].astype(np.float64)
        return x * logits - softplus(logits)  # -BCE with logits
    return log_normal(x, params["x_mean"].astype(np.float64), params["x_logvar"].astype(np.float64))


def decoder_mean(params: dict[str, np.ndarray], likelihood: str) -> np.ndarray:
    """E[x | z]: the Gaussian mean, or the Bernoulli probability."""
    if likelihood == "bernoulli":
        return 1.0 / (1.0 + np.exp(-params["x_logits"]))
    return params["x_mean"]


@functools.lru_cache(maxsize=64)
def posterior_noise(samples: int, latent_dim: int, seed: int) -> np.ndarray:
    """Standard normal noise [samples, latent_dim] for z = mu + sigma * eps; cached, read-only."""
    eps = np.random.default_rng(seed).standard_normal((samples, latent_dim))
    eps.flags.writeable = False
    return eps


def sum_over_first(a: np.ndarray) -> np.ndarray:
    """The sum over axis 0, one slice at a time: the same order of additions however many rows share the
    array. (NumPy's own reduction switches to pairwise summation when the other axes are one element
    wide, so a lone row would round differently from the same row in a batch.)"""
    total = a[0].copy()
    for part in a[1:]:
        total += part
    return total


def logsumexp(a: np.ndarray) -> np.ndarray:
    """log sum exp over axis 0, stable, in the row-independent order of sum_over_first."""
    top = np.max(a, axis=0)
    top = np.where(np.isfinite(top), top, 0.0)
    return top + np.log(sum_over_first(np.exp(a - top)))


@dataclass
class Scores:
    """Per-row scores, each [rows] unless noted; lower is more typical."""

    neg_elbo: np.ndarray  # -ELBO = reconstruction + kl
    reconstruction: np.ndarray  # -E_q[log p(x|z)]
    kl: np.ndarray  # KL(q(z|x) || p(z)), plus KL(q(y|x) || p(y)) when scored label-free
    neg_iw: np.ndarray | None  # -log (1/K) sum_k p(x, z_k) / q(z_k|x)
    per_feature: np.ndarray  # [rows, features]: -E_q[log p(x_d|z)]
    # [rows, features]: how far each value lies outside the support, in raw units (0 inside); None when
    # every value is inside. Set by Scorer, like the three below.
    support_distance: np.ndarray | None = None
    knn: np.ndarray | None = None  # mean squared distance to the k nearest reference rows; None without neighbours
    anomaly_score: np.ndarray | None = None  # the version's default score (Combination), or neg_elbo without one
    p_value: np.ndarray | None = None  # conformal p-value of anomaly_score (vaeserve.conformal); None uncalibrated

    @property
    def out_of_support(self) -> np.ndarray:
        """bool [rows]: the row has a value outside the support."""
        if self.support_distance is None:
            return np.zeros(len(self.neg_elbo), bool)
        return (self.support_distance > 0).any(axis=1)

    def distances(self) -> np.ndarray:
        """[rows, features] support_distance, zeros where every value is inside."""
        return np.zeros(self.per_feature.shape) if self.support_distance is None else self.support_distance

    def flagged(self, threshold: float) -> np.ndarray:
        """Anomalous rows: the anomaly score (neg_elbo where Scorer set none) above the threshold. A value
        outside the support counts through its penalty in the score, so the calibrated rate holds."""
        return (self.neg_elbo if self.anomaly_score is None else self.anomaly_score) > threshold

    def differences(self, reference: "Scores") -> tuple[dict[str, float], dict[str, float]]:
        """Max |self - reference| and max |self - reference| / (1 + |reference|) of each score both hold
        (neg_elbo, reconstruction, kl, neg_iw, per_feature); NaN where a value is NaN in one only."""
        absolute, relative = {}, {}
        for name in ("neg_elbo", "reconstruction", "kl", "neg_iw", "per_feature"):
            got, want = getattr(self, name), getattr(reference, name)
            if got is None or want is None:
                continue
            with np.errstate(invalid="ignore"):
                diff = np.where(got == want, 0.0, np.abs(got - want))  # inf == inf: no difference
            absolute[name] = float(np.max(diff, initial=0.0))
            relative[name] = float(np.max(diff / (1.0 + np.abs(want)), initial=0.0))
        return absolute, relative

    def rows(self, start: int, stop: int) -> "Scores":
        def cut(a):
            return None if a is None else a[start:stop]

        return Scores(**{f.name: cut(getattr(self, f.name)) for f in fields(self)})

    @classmethod
    def concatenate(cls, parts: list["Scores"]) -> "Scores":
        """Chunks of one batch, which agree on which fields they hold."""
        if len(parts) == 1:
            return parts[0]
        return cls(**{f.name: None if getattr(parts[0], f.name) is None else np.concatenate([getattr(p, f.name) for p in parts])
                      for f in fields(cls)})  # fmt: skip


def neighbour_distance(x: np.ndarray, reference: np.ndarray, k: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """Mean squared Euclidean distance of each row of x [rows, features] to its k nearest rows of
    `reference`, in float64: the NumPy reference the neighbour graph is checked against. `exclude[i]`: the
    index of row i itself in `reference` (leave-one-out), or -1."""
    x, reference = np.asarray(x, np.float64), np.asarray(reference, np.float64)
    squared = np.maximum((x**2).sum(axis=1)[:, None] - 2.0 * x @ reference.T + (reference**2).sum(axis=1)[None, :], 0.0)
    if exclude is not None:
        own = np.flatnonzero(exclude >= 0)
        squared[own, exclude[own]] = np.inf
    return np.partition(squared, k - 1, axis=1)[:, :k].mean(axis=1)


@dataclass(frozen=True)
class Combination:
    """The default anomaly score: the weighted sum of its parts (scores of Scores: neg_elbo and knn), each
    standardised by its mean and standard deviation over held-out normal rows (the validation rows at
    export), so that no part dominates by its units."""

    parts: tuple[str, ...]
    location: tuple[float, ...]
    scale: tuple[float, ...]
    weight: tuple[float, ...]

    @classmethod
    def fit(cls, s: "Scores", parts: tuple[str, ...] = COMBINED_PARTS, weight: tuple[float, ...] = COMBINED_WEIGHTS) -> "Combination":
        values = [np.asarray(getattr(s, name), np.float64) for name in parts]
        values = [v[np.isfinite(v)] for v in values]
        location = tuple(float(np.mean(v)) for v in values)
        scale = tuple(float(max(np.std(v), 1e-12 * max(1.0, abs(m)))) for v, m in zip(values, location))
        return cls(tuple(parts), location, scale, tuple(weight))

    def apply(self, s: "Scores") -> np.ndarray:
        total = np.zeros(len(s.neg_elbo))
        for name, location, scale, weight in zip(self.parts, self.location, self.scale, self.weight):
            total += weight * (getattr(s, name) - location) / scale
        return total

    def to_dict(self) -> dict:
        return {"parts": list(self.parts), "location": list(self.location), "scale": list(self.scale), "weight": list(self.weight)}


def score(
    x: np.ndarray,
    encode: Encode,
    decode: Decode,
    likelihood: str,
    *,
    labels: np.ndarray | None = None,
    class_prior: np.ndarray | None = None,
    elbo_samples: int = ELBO_SAMPLES,
    iw_samples: int = 0,
    seed: int = SEED,
    score_graph: ScoreGraph | None = None,
) -> Scores:
    """Score normalised rows x [rows, features].

    A conditional model gets one-hot `labels` [rows, classes], or `labels=None` and its `class_prior`
    to be scored label-free: log p(x) ~ log sum_y p(y) p(x|y), each p(x|y) through its own bound.
    `score_graph` (iw_samples 0 only) scores the rows given their labels in place of the NumPy path.
    """
    if score_graph is not None and iw_samples:
        raise ValueError("a score graph computes no importance-weighted bound; score with iw_samples 0")

    def given(x, labels):
        if score_graph is not None:
            return score_graph(np.asarray(x, np.float32), labels)
        return _score_given(x, labels, encode, decode, likelihood, elbo_samples, iw_samples, seed)

    if class_prior is None or labels is not None:
        return given(x, labels)

    rows, classes = x.shape[0], len(class_prior)
    # Every row under every label in one pass: row r with class c sits at c * rows + r.
    tiled_x = np.tile(x, (classes, 1))
    tiled_y = np.repeat(np.eye(classes, dtype=np.float32), rows, axis=0)
    each = given(tiled_x, tiled_y)
    log_prior = np.log(np.asarray(class_prior, np.float64))[:, None]

    def by_class(a):
        return a.reshape(classes, rows, *a.shape[1:])

    # log p(x) >= log sum_c p(c) exp(ELBO_c); the responsibilities q(c|x) make recon + kl add up to it.
    joint = log_prior - by_class(each.neg_elbo)
    neg_elbo = -logsumexp(joint)
    resp = np.exp(joint + neg_elbo)
    label_kl = sum_over_first(resp * (np.log(np.maximum(resp, 1e-300)) - log_prior))
    neg_iw = None
    if each.neg_iw is not None:
        neg_iw = -logsumexp(log_prior - by_class(each.neg_iw))
    return Scores(
        neg_elbo=neg_elbo,
        reconstruction=sum_over_first(resp * by_class(each.reconstruction)),
        kl=sum_over_first(resp * by_class(each.kl)) + label_kl,
        neg_iw=neg_iw,
        per_feature=sum_over_first(resp[..., None] * by_class(each.per_feature)),
    )


def _score_given(x, labels, encode, decode, likelihood, elbo_samples, iw_samples, seed) -> Scores:
    if elbo_samples < 1:
        raise ValueError("elbo_samples must be at least 1")
    x = np.asarray(x, np.float64)
    rows = x.shape[0]
    mu, logvar = encode(x.astype(np.float32), labels)
    mu, logvar = mu.astype(np.float64), logvar.astype(np.float64)
    latent_dim = mu.shape[1]
    samples = elbo_samples + iw_samples
    eps = posterior_noise(samples, latent_dim, seed)
    z = mu[None] + np.exp(0.5 * logvar)[None] * eps[:, None, :]  # [samples, rows, latent]
    tiled_labels = None if labels is None else np.tile(labels, (samples, 1))
    params = decode(z.reshape(samples * rows, latent_dim).astype(np.float32), tiled_labels)
    log_px_z = feature_log_likelihood(np.tile(x, (samples, 1)), params, likelihood).reshape(samples, rows, -1)

    per_feature = -sum_over_first(log_px_z[:elbo_samples]) / elbo_samples
    reconstruction = per_feature.sum(axis=1)
    kl = gaussian_kl(mu, logvar)
    neg_iw = None
    if iw_samples:
        z_iw = z[elbo_samples:]
        log_w = (
            log_px_z[elbo_samples:].sum(axis=2)
            + log_normal(z_iw, 0.0, 0.0).sum(axis=2)
            - log_normal(z_iw, mu[None], logvar[None]).sum(axis=2)
        )
        neg_iw = np.log(iw_samples) - logsumexp(log_w)  # Burda et al. 2016, eq. 8
    return Scores(reconstruction + kl, reconstruction, kl, neg_iw, per_feature)


# float64 values one chunk of a Score holds per array (rows x posterior samples x classes x features):
# 16 MiB each, so memory stays bounded whatever the request; a batch of the service's usual size
# (256 rows x 8 samples x 784 features, or 1024 rows at the default 2 samples) is one chunk.
CHUNK_VALUES = 1 << 21


def support_penalty(excess: np.ndarray) -> np.ndarray:
    """Nats added for a value `excess` normaliser units outside the support: a unit Gaussian tail beyond
    the box, so a value just past the training range costs next to nothing and one far outside costs
    without bound. Finite for every finite float32 (float64: (3.4e38 / 1e-8)^2 / 2 ~ 6e92)."""
    return 0.5 * excess**2


class Scorer:
    """The Score of one model, from raw rows.

    1. Support: each row is brought into the model's support box (each value moved to the nearest end of
       its interval) and the distance each value had to move is kept (raw units).
    2. The row in the box is normalised (for a Bernoulli likelihood, into its domain [0, 1]: the support
       spans validation rows too, which may lie past the training split's range) and scored (`score`),
       in chunks of at most `chunk_values`.
    3. Rows outside the support: per_feature of each value outside gets `support_penalty` of its distance
       in normaliser units added, and so do reconstruction, neg_elbo and neg_iw (kl stays that of the row in the box). A row
       outside therefore scores more than the same row brought back into range, more the farther out it
       is; `support_distance` says which values are outside and by how much.
       Any score that is not a number or -inf (a numerical breakdown) is +inf: a score is finite or +inf,
       never NaN, and an anomaly detector that cannot vouch for a row calls it anomalous.
    4. The anomaly score: with `neighbours` (the version's neighbour graph over `reference_rows` training
       and validation rows), `knn` of the rows as sent (neighbour_input); with a `combination`, its weighted
       sum of standardised parts, else neg_elbo; with a `calibration`, each row's conformal p-value.

    A conditional model scores with one-hot `labels`, or without them label-free over `class_prior`.
    With a `score_graph` (built for this model's likelihood, elbo_samples and seed), step 2 runs it in place of
    the NumPy path wherever iw_samples is 0 (label-free: on the rows tiled over the classes).
    """

    def __init__(self, encode: Encode, decode: Decode, likelihood: str, normalizer: Normalizer,
                 support: Support | None = None, *, class_prior: np.ndarray | None = None,
                 elbo_samples: int = ELBO_SAMPLES, seed: int = SEED, chunk_values: int = CHUNK_VALUES,
                 score_graph: ScoreGraph | None = None, neighbours: Neighbours | None = None,
                 reference_rows: int = 0, combination: Combination | None = None,
                 calibration: Calibration | None = None):  # fmt: skip
        decoder_outputs(likelihood)  # an unknown likelihood fails here, not at the first request
        self.score_graph = score_graph
        self.neighbours, self.reference_rows = neighbours, reference_rows
        if combination is not None and "knn" in combination.parts and neighbours is None:
            raise ValueError("a combination with knn needs the neighbour graph")
        self.combination, self.calibration = combination, calibration
        self.encode, self.decode, self.likelihood = encode, decode, likelihood
        self.normalizer, self.support = normalizer, support
        self.class_prior = None if class_prior is None else np.asarray(class_prior, np.float64)
        self.elbo_samples, self.seed, self.chunk_values = elbo_samples, seed, chunk_values
        self.features = len(normalizer.shift)

    def work_terms(self, rows: int, labelled: bool = False, iw_samples: int = 0) -> list[tuple[int, str]]:
        """The factors of a Score's work: rows x posterior samples (x classes, label-free) x features."""
        terms = [(rows, "rows"), (self.elbo_samples + iw_samples, "posterior samples")]
        if self.class_prior is not None and not labelled:
            terms.append((len(self.class_prior), "classes"))
        return terms + [(self.features, "features")]

    def work(self, rows: int, labelled: bool = False, iw_samples: int = 0) -> int:
        """Values a Score computes (the model's part; the neighbours' rows x reference rows x features is
        bounded by reference_budget)."""
        return math.prod(count for count, _ in self.work_terms(rows, labelled, iw_samples))

    def prepare(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw rows -> (normalised rows inside the support, [rows, features] float64 distance of each
        value outside it in raw units, or None when every value was inside)."""
        x = np.asarray(x, np.float32)
        distance = None
        if self.support is not None:
            inside = self.support.clip(x)
            if (inside != x).any():
                with np.errstate(invalid="ignore"):
                    distance = np.abs(x.astype(np.float64) - inside)
                distance[np.isnan(distance)] = np.inf  # a NaN value: infinitely far
            x = inside
        normalised = self.normalizer.apply(x)
        if self.likelihood == "bernoulli":  # its domain; the support can reach past the training split's range
            normalised = np.clip(normalised, 0.0, 1.0)
        return normalised, distance

    def penalty(self, distance: np.ndarray) -> np.ndarray:
        """support_penalty of raw distances outside the support, measured in normaliser units."""
        return support_penalty(distance / self.normalizer.scale)

    def uses_graph(self, iw_samples: int = 0) -> bool:
        """Whether a Score with these options runs the score graph (otherwise the NumPy path)."""
        return self.score_graph is not None and iw_samples == 0

    def score(self, x: np.ndarray, labels: np.ndarray | None = None, iw_samples: int = 0, *,
              reference: bool = False) -> Scores:  # fmt: skip
        """Scores of raw rows x [rows, features]; `labels` one-hot [rows, classes] or None. `reference`:
        on the NumPy path even where the score graph applies."""
        normalised, distance = self.prepare(x)
        rows = len(normalised)
        chunk = max(1, self.chunk_values // max(1, self.work(1, labels is not None, iw_samples)))
        graph = self.score_graph if self.uses_graph(iw_samples) and not reference else None
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            parts = [
                score(normalised[start : start + chunk], self.encode, self.decode, self.likelihood,
                      labels=None if labels is None else labels[start : start + chunk], class_prior=self.class_prior,
                      elbo_samples=self.elbo_samples, iw_samples=iw_samples, seed=self.seed, score_graph=graph)
                for start in range(0, rows, chunk)
            ]  # fmt: skip
            s = self._outside_and_fail_safe(Scores.concatenate(parts), distance)
            return self._anomaly_score(s, x)

    def neighbour_input(self, x: np.ndarray) -> np.ndarray:
        """Raw rows as the neighbour graph takes them: normalised, not brought into the support (a value
        outside is a distance from the training rows, not a point on the box), within +-KNN_CLIP (a
        standardising normaliser clips at its own +-clip first; the support penalty grows on beyond it)."""
        return np.clip(self.normalizer.apply(np.asarray(x, np.float32)), -KNN_CLIP, KNN_CLIP).astype(np.float32)

    def _anomaly_score(self, s: Scores, x: np.ndarray) -> Scores:
        """knn, the default anomaly score and its p-value."""
        if self.neighbours is not None:
            normalised = self.neighbour_input(x)
            # The graph's largest array is [rows, reference rows] (the Gemm's distances; the features are summed in it).
            chunk = max(1, self.chunk_values // max(1, self.reference_rows))
            parts = [np.asarray(self.neighbours(normalised[start : start + chunk]), np.float64).reshape(-1)
                     for start in range(0, len(normalised), chunk)]  # fmt: skip
            s.knn = fail_safe(np.concatenate(parts) if parts else np.zeros(0))
        s.anomaly_score = s.neg_elbo if self.combination is None else fail_safe(self.combination.apply(s))
        if self.calibration is not None:
            s.p_value = self.calibration.p_values(s.anomaly_score)
        return s

    def _outside_and_fail_safe(self, s: Scores, distance: np.ndarray | None) -> Scores:
        """The support penalty of values outside, and +inf for NaN and -inf. In place: the arrays are the
        scorer's own."""
        if distance is not None:
            nats = self.penalty(distance)
            s.per_feature += nats
            row_nats = nats.sum(axis=1)
            for a in (s.neg_elbo, s.reconstruction, s.neg_iw):
                if a is not None:
                    a += row_nats
            s.support_distance = distance
        for a in (s.neg_elbo, s.reconstruction, s.kl, s.neg_iw, s.per_feature):
            if a is not None:
                fail_safe(a)
        return s


def fail_safe(a: np.ndarray) -> np.ndarray:
    """NaN and -inf in a score become +inf, in place: a detector that cannot vouch for a row calls it anomalous."""
    if not (a > -np.inf).all():
        a[~(a > -np.inf)] = np.inf
    return a
