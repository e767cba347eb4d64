"""Served model versions: the manifest turned into batched graph calls (and batched Score pipelines)
and the domain operations of the API on NumPy arrays. Rows arrive raw, are normalised with the manifest's
normaliser, and decoder means go back to raw units. Inputs are checked here and rejected with
InvalidInput naming the problem; nothing here knows about gRPC.
"""

import logging
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from vaeserve import scoring
from vaeserve.errors import ConfigError, InvalidInput, ModelNotFound
from vaeserve.normalization import Normalizer
from vaeserve.service import metrics
from vaeserve.service.batching import BatcherConfig, DynamicBatcher
from vaeserve.service.runtime import Graph, scoring_callables
from vaeserve.service.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class ScoreResult:
    scores: scoring.Scores
    threshold: float
    is_anomaly: np.ndarray


class ServedModel:
    def __init__(self, version, settings: Settings, executor: Executor):
        manifest = version.manifest
        self.name, self.version, self.manifest = version.name, version.version, manifest
        self.settings = settings
        self.kind = manifest["model"]["kind"]
        self.likelihood = manifest["model"]["likelihood"]
        self.latent_dim = int(manifest["model"]["latent_dim"])
        self.features = int(manifest["input"]["features"])
        self.normalizer = Normalizer.from_dict(manifest["normalization"])
        labels = manifest.get("labels") or None
        self.label_names = list(labels["names"]) if labels else []
        self.class_prior = np.asarray(labels["prior"], np.float64) if labels else None
        self._label_order = np.argsort(np.asarray(self.label_names, dtype=object).astype(str)) if labels else None
        thresholds = manifest["thresholds"]
        self.threshold = float(thresholds["default"])
        self.elbo_samples = int(thresholds.get("elbo_samples", scoring.ELBO_SAMPLES))
        self.seed = int(thresholds.get("seed", scoring.SEED))

        self.encoder = Graph(version.encoder_path, settings.intra_op_threads)
        self.decoder = Graph(version.decoder_path, settings.intra_op_threads)
        self.conditional = "y" in self.encoder.inputs
        if self.conditional and not self.label_names:
            raise ConfigError(f"{version.path}: the graphs take labels y but the manifest names none")
        self._encode, self._decode = scoring_callables(self.encoder, self.decoder)
        config = BatcherConfig(settings.max_batch_size, settings.max_queue_delay_ms / 1000.0, settings.max_queue_size)
        self.batchers = {
            "encoder": DynamicBatcher(lambda feeds, _: self.encoder.run(feeds), config, executor, model=self.name, graph="encoder"),
            "decoder": DynamicBatcher(lambda feeds, _: self.decoder.run(feeds), config, executor, model=self.name, graph="decoder"),
            # Score runs encoder, sampling, decoder and likelihood as one batched unit.
            "score": DynamicBatcher(self._score_batch, config, executor, model=self.name, graph="score",
                                    split=_slice_scores, work=self._score_work),  # fmt: skip
        }
        for graph_name, graph in (("encoder", self.encoder), ("decoder", self.decoder)):
            metrics.MODEL_INFO.labels(self.name, str(self.version), graph_name, graph.providers[0]).set(1)

    def warm_up(self, rows: int) -> None:
        """Run every graph once on zeros, so the first request pays no lazy initialisation."""
        if rows == 0:
            return
        y = np.zeros((rows, len(self.label_names)), np.float32) if self.conditional else None
        self.encoder.run({"x": np.zeros((rows, self.features), np.float32), "y": y})
        self.decoder.run({"z": np.zeros((rows, self.latent_dim), np.float32), "y": y})

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

    # Input checks.

    def rows(self, x: np.ndarray, what: str = "x", width: int | None = None) -> np.ndarray:
        width = self.features if width is None else width
        if x.ndim != 2:
            raise InvalidInput(f"{what}: expected a 2-D tensor [rows, {width}], got shape {list(x.shape)}")
        if x.shape[0] == 0:
            raise InvalidInput(f"{what}: zero rows; send at least one")
        if x.shape[0] > self.settings.max_rows:
            raise InvalidInput(f"{what}: {x.shape[0]} rows is more than the limit of {self.settings.max_rows} per request")
        if x.shape[1] != width:
            raise InvalidInput(f"{what}: model {self.name!r} takes {width} values per row, got {x.shape[1]}")
        if not np.isfinite(x).all():
            bad = np.argwhere(~np.isfinite(x))[0]
            raise InvalidInput(f"{what}: NaN or Inf at row {bad[0]}, column {bad[1]}")
        return x

    def one_hot(self, labels, rows: int, *, required: bool) -> np.ndarray | None:
        """One-hot rows for label names; None for an unconditional model, or when not required and absent."""
        labels = list(labels)
        if not self.conditional:
            if labels:
                raise InvalidInput(f"model {self.name!r} is unconditional; send no labels")
            return None
        if not labels:
            if required:
                raise InvalidInput(f"model {self.name!r} is conditional: send one label per row, from {self.label_names}")
            return None
        if len(labels) != rows:
            raise InvalidInput(f"{len(labels)} labels for {rows} rows; send one label per row")
        names = np.asarray(self.label_names, dtype=object).astype(str)
        wanted = np.asarray(labels, dtype=str)
        sorted_names = names[self._label_order]
        at = np.clip(np.searchsorted(sorted_names, wanted), 0, len(names) - 1)
        known = sorted_names[at] == wanted
        if not known.all():
            unknown = str(wanted[~known][0])
            raise InvalidInput(f"unknown label {unknown!r}; model {self.name!r} knows {self.label_names}")
        return np.eye(len(names), dtype=np.float32)[self._label_order[at]]

    # The API's operations.

    async def embed(self, x, labels, posterior_samples: int, seed: int | None, deadline=None):
        x = self.rows(x)
        y = self.one_hot(labels, len(x), required=True)
        if posterior_samples > self.settings.max_posterior_samples:
            raise InvalidInput(
                f"posterior_samples {posterior_samples} is more than the limit of {self.settings.max_posterior_samples}"
            )
        mu, logvar = await self.encode(self.normalizer.apply(x), y, deadline)
        samples = None
        if posterior_samples:
            eps = np.random.default_rng(seed).standard_normal((posterior_samples, *mu.shape), dtype=np.float32)
            samples = mu[None] + np.exp(0.5 * logvar)[None] * eps
        return mu, logvar, samples

    async def reconstruct(self, x, labels, deadline=None):
        x = self.rows(x)
        y = self.one_hot(labels, len(x), required=True)
        normalised = self.normalizer.apply(x)
        mu, _ = await self.encode(normalised, y, deadline)
        params = await self.decode(mu, y, deadline)
        x_hat = self.normalizer.invert(scoring.decoder_mean(params, self.likelihood))
        nll = -scoring.feature_log_likelihood(normalised.astype(np.float64), params, self.likelihood).sum(axis=1)
        mse = np.mean((x.astype(np.float64) - x_hat) ** 2, axis=1)
        return x_hat, nll, mse

    async def score(self, x, labels, threshold: float | None, iw_samples: int, deadline=None) -> ScoreResult:
        x = self.rows(x)
        y = self.one_hot(labels, len(x), required=False)
        if iw_samples > self.settings.max_iw_samples:
            raise InvalidInput(f"iw_samples {iw_samples} is more than the limit of {self.settings.max_iw_samples}")
        if threshold is not None and not np.isfinite(threshold):
            raise InvalidInput(f"threshold must be finite, got {threshold}")

        feeds = {"x": x} if y is None else {"x": x, "y": y}  # normalised once per batch
        scores = await self.batchers["score"].submit(feeds, deadline, key=(y is not None, iw_samples))
        threshold = self.threshold if threshold is None else float(threshold)
        return ScoreResult(scores, threshold, scores.neg_elbo > threshold)

    def _score_work(self, rows: int, key: tuple) -> int:
        """Decoder rows a Score batch runs: every posterior sample, under every class when label-free."""
        labelled, iw_samples = key
        classes = len(self.label_names) if self.conditional and not labelled else 1
        return rows * classes * (self.elbo_samples + iw_samples)

    def _score_batch(self, feeds: dict, key: tuple) -> scoring.Scores:
        """Score the raw rows of a batch of requests that share their options."""
        _, iw_samples = key
        return scoring.score(
            self.normalizer.apply(feeds["x"]), self._encode, self._decode, self.likelihood,
            labels=feeds.get("y"), class_prior=self.class_prior if self.conditional else None,
            elbo_samples=self.elbo_samples, iw_samples=iw_samples, seed=self.seed,
        )  # fmt: skip

    async def generate(self, count: int, labels, temperature: float, seed: int | None, deadline=None):
        labels = list(labels)
        if self.conditional:
            if not labels:
                raise InvalidInput(f"model {self.name!r} is conditional: send one label per sample, from {self.label_names}")
            if count not in (0, len(labels)):
                raise InvalidInput(f"count {count} does not match the {len(labels)} labels; send one label per sample")
            count = len(labels)
        elif count == 0:
            raise InvalidInput("count is zero; ask for at least one sample")
        if count > self.settings.max_rows:
            raise InvalidInput(f"{count} samples is more than the limit of {self.settings.max_rows} per request")
        if not np.isfinite(temperature) or temperature < 0:
            raise InvalidInput(f"temperature must be finite and >= 0, got {temperature}")
        y = self.one_hot(labels, count, required=True)
        # Conditional generation: z ~ N(0, T^2 I), x = decoder mean at (z, y).
        z = np.random.default_rng(seed).standard_normal((count, self.latent_dim), dtype=np.float32) * np.float32(temperature)
        params = await self.decode(z, y, deadline)
        return self.normalizer.invert(scoring.decoder_mean(params, self.likelihood)), z

    async def decode_latent(self, z, labels, deadline=None) -> np.ndarray:
        z = self.rows(z, "z", self.latent_dim)
        y = self.one_hot(labels, len(z), required=True)
        params = await self.decode(z, y, deadline)
        return self.normalizer.invert(scoring.decoder_mean(params, self.likelihood))


def _slice_scores(s: scoring.Scores, start: int, stop: int) -> scoring.Scores:
    rows = slice(start, stop)
    return scoring.Scores(
        s.neg_elbo[rows], s.reconstruction[rows], s.kl[rows], None if s.neg_iw is None else s.neg_iw[rows], s.per_feature[rows]
    )


class ModelRegistry:
    """Every served version of every model; version 0 means the newest."""

    def __init__(self, models: dict[str, dict[int, ServedModel]]):
        self.models = models

    @classmethod
    def load(cls, settings: Settings, executor: Executor) -> "ModelRegistry":
        from vaeserve.export.repository import scan_repository

        found = scan_repository(settings.repository)
        if not found:
            raise ConfigError(f"no valid model version under {settings.repository}")
        models = {}
        for name, versions in found.items():
            models[name] = {}
            for number, version in sorted(versions.items()):
                served = ServedModel(version, settings, executor)
                served.warm_up(settings.warmup_rows)
                models[name][number] = served
                log.info("loaded %s version %d (%s, providers %s)", name, number, served.kind, served.encoder.providers)
        return cls(models)

    def get(self, name: str, version: int = 0) -> ServedModel:
        if not name:
            raise InvalidInput(f"the request names no model; served: {sorted(self.models)}")
        versions = self.models.get(name)
        if versions is None:
            raise ModelNotFound(f"no model {name!r}; served: {sorted(self.models)}")
        if version == 0:
            return versions[max(versions)]
        if version not in versions:
            raise ModelNotFound(f"model {name!r} has no version {version}; served versions: {sorted(versions)}")
        return versions[version]

    def all(self) -> list[ServedModel]:
        return [m for versions in self.models.values() for m in versions.values()]
