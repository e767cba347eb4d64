"""Served model versions: an opened artifact (vaeserve.artifact.runtime.Model) behind batchers, and the
domain operations of the API on NumPy arrays. Rows arrive raw and go through the version's Scorer:
brought into the model's support, normalised, scored; decoder means go back to raw units. Inputs are
checked here and rejected with InvalidInput naming the problem, and every request's work is counted
against the settings' budget before anything is computed; nothing here knows about gRPC.

What a row outside the model's support gets (see vaeserve.scoring.Scorer): Score scores the row brought
back into the support plus a penalty growing with the distance outside, and flags it whatever the
threshold; Embed and Reconstruct work on the row brought back, and Reconstruct's neg_log_likelihood
carries the same penalty.
"""

import asyncio
import logging
import math
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from vaeserve import scoring
from vaeserve.artifact.repository import scan_repository
from vaeserve.artifact.runtime import Model
from vaeserve.errors import SHOWN, ArtifactError, ConfigError, InvalidInput, ModelNotFound
from vaeserve.service import metrics
from vaeserve.service.batching import INLINE_WORK, BatcherConfig, DynamicBatcher
from vaeserve.service.settings import Settings

log = logging.getLogger(__name__)

# A batcher's queue holds at most this many requests' worth of max_request_values: a burst of the largest
# requests waits a few batches at most, and queued inputs stay a bounded multiple of one request's.
QUEUED_REQUESTS_OF_WORK = 4
MAX_TEMPERATURE = 100.0  # Generate: z ~ N(0, T^2 I); far beyond any useful T, and decoders stay finite
MAX_LATENT = 1000.0  # Decode: |z| per coordinate, in prior standard deviations


def quoted(text: str) -> str:
    """repr of a caller's string, cut so an error message stays short."""
    return repr(text) if len(text) <= SHOWN else repr(text[:SHOWN]) + f"... ({len(text)} characters)"


def listed(names, limit: int = 20) -> str:
    names = [str(n) for n in names]
    shown = ", ".join(quoted(n) for n in names[:limit])
    return f"[{shown}{f', ... {len(names) - limit} more' if len(names) > limit else ''}]"


@dataclass
class ScoreResult:
    scores: scoring.Scores
    threshold: float
    is_anomaly: np.ndarray


class ServedModel:
    def __init__(self, model: Model, settings: Settings, executor: Executor):
        m = model.manifest
        self.artifact, self.manifest, self.settings, self._executor = model, m, settings, executor
        self.name, self.version = m.name, m.version
        self.kind, self.likelihood = m.model.kind, m.scoring.likelihood
        self.latent_dim, self.features = m.model.latent_dim, m.input.features
        self.scorer = model.scorer
        self._row_work: dict[tuple, int] = {}  # Score batch key (labelled, iw_samples) -> work of one row
        self.label_names = list(m.labels or ())
        self._label_index = {name: i for i, name in enumerate(self.label_names)}
        self.conditional = m.conditional
        self.threshold = m.thresholds.default
        self.encoder, self.decoder = model.encoder, model.decoder
        config = BatcherConfig(settings.max_batch_size, settings.max_queue_delay_ms / 1000.0, settings.max_queue_size,
                               settings.max_request_values, QUEUED_REQUESTS_OF_WORK * settings.max_request_values)  # fmt: skip
        self.batchers = {
            "encoder": DynamicBatcher(lambda feeds, _: self.encoder.run(feeds), config, executor, model=self.name, graph="encoder",
                                      work=lambda rows, _: rows * self.features),  # fmt: skip
            "decoder": DynamicBatcher(lambda feeds, _: self.decoder.run(feeds), config, executor, model=self.name, graph="decoder",
                                      work=lambda rows, _: rows * self.features),  # fmt: skip
            # Score runs encoder, sampling, decoder and likelihood as one batched unit.
            "score": DynamicBatcher(self._score_batch, config, executor, model=self.name, graph="score",
                                    split=scoring.Scores.rows, work=self._score_work),  # fmt: skip
        }
        for graph_name, graph in (("encoder", self.encoder), ("decoder", self.decoder)):
            metrics.MODEL_INFO.labels(self.name, str(self.version), graph_name, graph.providers[0]).set(1)

    def start(self) -> None:
        for batcher in self.batchers.values():
            batcher.start()

    def drain(self) -> None:
        for batcher in self.batchers.values():
            batcher.drain()

    async def close(self) -> None:
        for batcher in self.batchers.values():
            await batcher.close()

    # Graph calls through the batchers.

    def _feeds(self, name: str, value: np.ndarray, y: np.ndarray | None) -> dict:
        return {name: value} if y is None else {name: value, "y": y}

    async def encode(self, x: np.ndarray, y: np.ndarray | None, deadline: float | None = None):
        out = await self.batchers["encoder"].submit(self._feeds("x", x, y), deadline)
        return out["mu"], out["logvar"]

    async def decode(self, z: np.ndarray, y: np.ndarray | None, deadline: float | None = None) -> dict:
        return await self.batchers["decoder"].submit(self._feeds("z", z, y), deadline)

    # Input checks. Shapes were checked when the tensor was read (vaeserve.service.convert).

    def finite(self, x: np.ndarray, what: str = "x", limit: float | None = None) -> np.ndarray:
        bad = ~np.isfinite(x) if limit is None else ~(np.abs(x) <= limit)
        if bad.any():
            row, column = np.argwhere(bad)[0]
            problem = "NaN or Inf" if limit is None or not np.isfinite(x[row, column]) else f"a value beyond +-{limit:g}"
            raise InvalidInput(f"{what}: {problem} at row {row}, column {column}")
        return x

    def budget(self, terms: list[tuple[int, str]]) -> None:
        """Refuse a request whose work (the product of its terms) is above max_request_values, before computing it."""
        work = math.prod(count for count, _ in terms)
        if work > self.settings.max_request_values:
            raise InvalidInput(
                f"this request needs {work:,} values of work ({' x '.join(f'{n} {what}' for n, what in terms)}), "
                f"more than max_request_values {self.settings.max_request_values:,}; send fewer rows or ask for fewer samples"
            )

    def one_hot(self, labels, rows: int, *, required: bool) -> np.ndarray | None:
        """One-hot rows for label names; None for an unconditional model, or when not required and absent."""
        labels = list(labels)
        if not self.conditional:
            if labels:
                raise InvalidInput(f"model {quoted(self.name)} is unconditional; send no labels")
            return None
        if not labels:
            if required:
                raise InvalidInput(f"model {quoted(self.name)} is conditional: send one label per row, from {listed(self.label_names)}")
            return None
        if len(labels) != rows:
            raise InvalidInput(f"{len(labels)} labels for {rows} rows; send one label per row")
        index = [self._label_index.get(label, -1) for label in labels]  # exact match: "3\x00" is not "3"
        if min(index) < 0:
            unknown = labels[index.index(-1)]
            raise InvalidInput(f"unknown label {quoted(unknown)}; model {quoted(self.name)} knows {listed(self.label_names)}")
        return np.eye(len(self.label_names), dtype=np.float32)[index]

    # The API's operations.

    def _samples(self, mu, logvar, posterior_samples: int, seed: int | None) -> np.ndarray:
        eps = np.random.default_rng(seed).standard_normal((posterior_samples, *mu.shape), dtype=np.float32)
        return mu[None] + np.exp(0.5 * logvar)[None] * eps

    async def embed(self, x, labels, posterior_samples: int, seed: int | None, deadline=None):
        x = self.finite(x)
        y = self.one_hot(labels, len(x), required=True)
        if posterior_samples > self.settings.max_posterior_samples:
            raise InvalidInput(
                f"posterior_samples {posterior_samples} is more than the limit of {self.settings.max_posterior_samples}"
            )
        if posterior_samples:
            self.budget([(len(x), "rows"), (posterior_samples, "posterior samples"), (self.latent_dim, "latent dimensions")])
        self.budget([(len(x), "rows"), (self.features, "features")])
        mu, logvar = await self.encode(self.scorer.prepare(x)[0], y, deadline)
        samples = None
        if posterior_samples and posterior_samples * mu.size <= INLINE_WORK:
            samples = self._samples(mu, logvar, posterior_samples, seed)
        elif posterior_samples:  # many: off the event loop (4096 rows x 256 samples took ~0.3 s)
            loop = asyncio.get_running_loop()
            samples = await loop.run_in_executor(self._executor, self._samples, mu, logvar, posterior_samples, seed)
        return mu, logvar, samples

    async def reconstruct(self, x, labels, deadline=None):
        x = self.finite(x)
        y = self.one_hot(labels, len(x), required=True)
        self.budget([(len(x), "rows"), (self.features, "features")])
        normalised, distance = self.scorer.prepare(x)
        mu, _ = await self.encode(normalised, y, deadline)
        params = await self.decode(mu, y, deadline)
        x_hat = self.scorer.normalizer.invert(scoring.decoder_mean(params, self.likelihood))
        nll = -scoring.feature_log_likelihood(normalised.astype(np.float64), params, self.likelihood).sum(axis=1)
        if distance is not None:
            nll += self.scorer.penalty(distance).sum(axis=1)
        mse = np.mean((x.astype(np.float64) - x_hat) ** 2, axis=1)
        return x_hat, scoring.fail_safe(nll), scoring.fail_safe(mse)

    async def score(self, x, labels, threshold: float | None, iw_samples: int, deadline=None) -> ScoreResult:
        x = self.finite(x)
        y = self.one_hot(labels, len(x), required=False)
        if iw_samples > self.settings.max_iw_samples:
            raise InvalidInput(f"iw_samples {iw_samples} is more than the limit of {self.settings.max_iw_samples}")
        if threshold is not None and not np.isfinite(threshold):
            raise InvalidInput(f"threshold must be finite, got {threshold}")
        self.budget(self.scorer.work_terms(len(x), y is not None, iw_samples))

        feeds = {"x": x} if y is None else {"x": x, "y": y}  # normalised once per batch
        scores = await self.batchers["score"].submit(feeds, deadline, key=(y is not None, iw_samples))
        threshold = self.threshold if threshold is None else float(threshold)
        return ScoreResult(scores, threshold, scores.flagged(threshold))

    def _score_work(self, rows: int, key: tuple) -> int:
        """Linear in rows, so the work of one row per key is kept: the batcher asks several times per request."""
        per_row = self._row_work.get(key)
        if per_row is None:
            per_row = self._row_work[key] = self.scorer.work(1, *key)
        return rows * per_row

    def _score_batch(self, feeds: dict, key: tuple) -> scoring.Scores:
        """Score the raw rows of a batch of requests that share their options."""
        return self.scorer.score(feeds["x"], feeds.get("y"), key[1])

    async def generate(self, count: int, labels, temperature: float, seed: int | None, deadline=None):
        labels = list(labels)
        if self.conditional:
            if not labels:
                raise InvalidInput(f"model {quoted(self.name)} is conditional: send one label per sample, from {listed(self.label_names)}")
            if count not in (0, len(labels)):
                raise InvalidInput(f"count {count} does not match the {len(labels)} labels; send one label per sample")
            count = len(labels)
        elif count == 0:
            raise InvalidInput("count is zero; ask for at least one sample")
        if count > self.settings.max_rows:
            raise InvalidInput(f"{count} samples is more than the limit of {self.settings.max_rows} per request")
        if not 0 <= temperature <= MAX_TEMPERATURE:
            raise InvalidInput(f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {temperature}")
        y = self.one_hot(labels, count, required=True)
        self.budget([(count, "rows"), (self.features, "features")])
        # Conditional generation: z ~ N(0, T^2 I), x = decoder mean at (z, y).
        z = np.random.default_rng(seed).standard_normal((count, self.latent_dim), dtype=np.float32) * np.float32(temperature)
        params = await self.decode(z, y, deadline)
        return self.scorer.normalizer.invert(scoring.decoder_mean(params, self.likelihood)), z

    async def decode_latent(self, z, labels, deadline=None) -> np.ndarray:
        z = self.finite(z, "z", MAX_LATENT)
        y = self.one_hot(labels, len(z), required=True)
        self.budget([(len(z), "rows"), (self.features, "features")])
        params = await self.decode(z, y, deadline)
        return self.scorer.normalizer.invert(scoring.decoder_mean(params, self.likelihood))


def no_valid_version(repository) -> ConfigError:
    return ConfigError(f"no valid model version under {repository}; the log says why each was skipped")


def open_models(settings: Settings) -> list[Model]:
    """Every version of the repository that reads, checks and opens (scan_repository, then Model); the
    others are skipped with one log line naming the file and the reason. ConfigError when none is left."""
    opened = []
    for numbered in scan_repository(settings.repository).values():
        for version in numbered.values():
            try:
                opened.append(Model(version, settings.intra_op_threads))
            except ArtifactError as err:
                log.error("skipping %s: %s", version.path, err)
    if not opened:
        raise no_valid_version(settings.repository)
    return opened


class ModelRegistry:
    """Every served version of every model; version 0 means the newest."""

    def __init__(self, models: dict[str, dict[int, ServedModel]]):
        self.models = models

    @classmethod
    def load(cls, settings: Settings, executor: Executor, opened: list[Model]) -> "ModelRegistry":
        """Warm up every opened version and serve it; one whose warm-up fails its check is skipped with one
        log line naming the file and the reason. ConfigError when none is left."""
        models = {}
        for artifact in opened:
            version = artifact.version
            try:
                artifact.check(settings.warmup_rows)
            except ArtifactError as err:
                log.error("skipping %s: %s", version.path, err)
                continue
            models.setdefault(version.name, {})[version.version] = ServedModel(artifact, settings, executor)
            log.info("loaded %s version %d (%s, providers %s)", version.name, version.version, version.manifest.model.kind,
                     artifact.encoder.providers)  # fmt: skip
        if not models:
            raise no_valid_version(settings.repository)
        return cls({name: dict(sorted(numbered.items())) for name, numbered in models.items()})

    def get(self, name: str, version: int = 0) -> ServedModel:
        if not name:
            raise InvalidInput(f"the request names no model; served: {listed(sorted(self.models))}")
        versions = self.models.get(name)
        if versions is None:
            raise ModelNotFound(f"no model {quoted(name)}; served: {listed(sorted(self.models))}")
        if version == 0:
            return versions[max(versions)]
        if version not in versions:
            raise ModelNotFound(f"model {quoted(name)} has no version {version}; served versions: {sorted(versions)}")
        return versions[version]

    def all(self) -> list[ServedModel]:
        return [m for versions in self.models.values() for m in versions.values()]
