"""Served model versions: an opened artifact (vaeserve.artifact.runtime.Model) behind batchers, and the
domain operations of the API on NumPy arrays. Rows arrive raw and go through the version's Scorer:
brought into the model's support, normalised, scored; decoder means go back to raw units. Inputs are
checked here and rejected with InvalidInput naming the problem, and every request's work is counted
against the settings' budget before anything is computed; nothing here knows about gRPC.

What a row outside the model's support gets (see vaeserve.scoring.Scorer): Score scores the row brought
back into the support plus a penalty growing with the distance outside, which its anomaly score carries
(so a row far outside is flagged, and the calibrated false-positive rate holds for rows just past the
range); Embed and Reconstruct work on the row brought back, and Reconstruct's neg_log_likelihood carries
the same penalty.

Score flags rows whose anomaly score (the score the manifest's thresholds apply to) is above the threshold:
the request's, or the one a requested false-positive rate alpha gives on the version's conformal
calibration (vaeserve.conformal), or the manifest's default.

Which versions are served: the newest max_versions of each model that load (all of them when 0). The
repository is read at start and again on every rescan (vaeserve.service.reload says when), where a folder
is read only when its fingerprint changed. A new set of versions is swapped in in one step on the event
loop; a version that leaves waits for the requests inside it, then closes its batchers and lets go of its
ONNX Runtime sessions.
"""

import asyncio
import contextlib
import logging
import math
import os
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from vaeserve import scoring
from vaeserve.artifact.manifest import MANIFEST, Manifest
from vaeserve.artifact.repository import ModelVersion, load_version, version_folders
from vaeserve.artifact.runtime import Model
from vaeserve.errors import ArtifactError, ConfigError, InvalidInput, ModelNotFound, listed, quoted
from vaeserve.service import metrics
from vaeserve.service.batching import INLINE_WORK, BatcherConfig, DynamicBatcher
from vaeserve.service.settings import Settings

log = logging.getLogger(__name__)

# A batcher's queue holds at most this many requests' worth of max_request_values: a burst of the largest
# requests waits a few batches at most, and queued inputs stay a bounded multiple of one request's.
QUEUED_REQUESTS_OF_WORK = 4
MAX_TEMPERATURE = 100.0  # Generate: z ~ N(0, T^2 I); far beyond any useful T, and decoders stay finite
MAX_LATENT = 1000.0  # Decode: |z| per coordinate, in prior standard deviations


@dataclass
class ScoreResult:
    scores: scoring.Scores
    threshold: float  # on scores.anomaly_score
    is_anomaly: np.ndarray


class ServedModel:
    def __init__(self, model: Model, settings: Settings, executor: Executor, fingerprint: "Fingerprint"):
        m = model.manifest
        self.artifact, self.manifest, self.settings, self._executor = model, m, settings, executor
        self.name, self.version = m.name, m.version
        self.fingerprint = fingerprint  # of the folder it was read from, before it was read
        self._users = 0  # requests inside an RPC holding this version
        self._idle = asyncio.Event()  # set while _users is 0
        self._idle.set()
        self.kind, self.likelihood = m.model.kind, m.scoring.likelihood
        self.latent_dim, self.features = m.model.latent_dim, m.input.features
        self.scorer = model.scorer
        self._row_work: dict[tuple, int] = {}  # Score batch key (labelled, iw_samples) -> work of one row
        self.label_names = list(m.labels or ())
        self._label_index = {name: i for i, name in enumerate(self.label_names)}
        self.conditional = m.conditional
        self.threshold = m.thresholds.default
        self._version_label = str(self.version)
        self._scored = metrics.SCORED_ROWS.labels(self.name, self._version_label)
        self._anomalous = metrics.ANOMALOUS_ROWS.labels(self.name, self._version_label)
        # The histogram places anomaly scores among the quantiles of the score the thresholds apply to.
        calibration = m.thresholds.quantiles.get(m.thresholds.score, {})
        levels = [q for q in metrics.QUANTILE_LEVELS if str(q) in calibration]  # what the manifest holds
        self._level_values = np.array([calibration[str(q)] for q in levels])
        self._level_bounds = np.array([*levels, 1.0])  # a row's level by its index among the values
        self._anomaly_score = metrics.ANOMALY_SCORE.labels(self.name, self._version_label)
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

    def info_labels(self) -> list[tuple[str, str, str, str]]:
        """metrics.MODEL_INFO's labels of this version's graphs."""
        return [(self.name, str(self.version), name, graph.providers[0]) for name, graph in self.graphs().items()]

    def graphs(self) -> dict:
        """This version's ONNX Runtime graphs by name: encoder, decoder, and score when it has one."""
        graphs = {"encoder": self.encoder, "decoder": self.decoder}
        if self.artifact.score_graph is not None:
            graphs["score"] = self.artifact.score_graph
        return graphs

    def start(self) -> None:
        for batcher in self.batchers.values():
            batcher.start()

    @contextlib.contextmanager
    def in_use(self):
        """Held around every RPC that uses this version, awaits included (Reconstruct submits to the encoder,
        then to the decoder): a version leaving service waits until none is inside."""
        self._users += 1
        self._idle.clear()
        metrics.SERVED_VERSION.set(self._version_label)  # for the call's request metrics
        try:
            yield self
        finally:
            self._users -= 1
            if not self._users:
                self._idle.set()

    async def retire(self) -> None:
        """Leave service (the registry no longer hands this version out): run what is queued without waiting
        for batches to fill, wait for the requests inside to finish, then close the batchers and let go of
        them, so that nothing keeps the ONNX Runtime sessions once the last request drops this version."""
        self.drain()
        await self._idle.wait()
        await self.close()
        self.batchers = {}  # they call back into this version: a cycle that only a full collection would free
        log.info("unloaded %s version %d", self.name, self.version)

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

    def flag_threshold(self, threshold: float | None, alpha: float | None) -> float:
        """The threshold a Score applies on the anomaly score: the request's, the one that flags p-values
        <= alpha (false-positive rate alpha on rows like the calibration rows), or the manifest's default."""
        if alpha is None:
            if threshold is not None and not np.isfinite(threshold):
                raise InvalidInput(f"threshold must be finite, got {threshold}")
            return self.threshold if threshold is None else float(threshold)
        if threshold is not None:
            raise InvalidInput("give a threshold or alpha, not both: alpha sets the threshold")
        if self.scorer.calibration is None:
            raise InvalidInput(f"model {quoted(self.name)} version {self.version} was exported without conformal "
                               "calibration: it has no p-values to flag at alpha; send a threshold")  # fmt: skip
        return self.scorer.calibration.threshold(float(alpha))

    async def score(self, x, labels, threshold: float | None, iw_samples: int, deadline=None,
                    alpha: float | None = None) -> ScoreResult:  # fmt: skip
        x = self.finite(x)
        y = self.one_hot(labels, len(x), required=False)
        if iw_samples > self.settings.max_iw_samples:
            raise InvalidInput(f"iw_samples {iw_samples} is more than the limit of {self.settings.max_iw_samples}")
        threshold = self.flag_threshold(threshold, alpha)
        self.budget(self.scorer.work_terms(len(x), y is not None, iw_samples))

        feeds = {"x": x} if y is None else {"x": x, "y": y}  # normalised once per batch
        scores = await self.batchers["score"].submit(feeds, deadline, key=(y is not None, iw_samples))
        result = ScoreResult(scores, threshold, scores.flagged(threshold))
        self._anomalous.inc(int(np.count_nonzero(result.is_anomaly)))  # at the request's own threshold
        return result

    def _score_work(self, rows: int, key: tuple) -> int:
        """Linear in rows, so the work of one row per key is kept: the batcher asks several times per request."""
        per_row = self._row_work.get(key)
        if per_row is None:
            per_row = self._row_work[key] = self.scorer.work(1, *key)
        return rows * per_row

    def _score_batch(self, feeds: dict, key: tuple) -> scoring.Scores:
        """Score the raw rows of a batch of requests that share their options, and count them in the anomaly
        metrics: each row's calibration quantile level is the smallest level whose calibration anomaly score
        it does not exceed (1 above them all). Once per batch, not per request: single-row calls come in batches."""
        scores = self.scorer.score(feeds["x"], feeds.get("y"), key[1])
        self._scored.inc(len(scores.neg_elbo))
        if len(self._level_values):
            index = np.searchsorted(self._level_values, scores.anomaly_score, side="left")
            metrics.observe_levels(self._anomaly_score, self._level_bounds[index])
        return scores

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


# Reading the repository.

Key = tuple[str, int]  # (model, version)
# A version folder's identity: manifest.json's inode, size, mtime and ctime, and the folder's inode and mtime.
# Export writes the manifest last and it holds the graphs' sha256s, so an unchanged fingerprint means an
# unchanged version without reading or hashing anything; files added to the folder change its mtime.
Fingerprint = tuple[int, int, int, int, int, int]
Snapshot = dict[str, dict[int, tuple[Path, Fingerprint | None]]]  # model -> version -> (folder, fingerprint)
Loaded = TypeVar("Loaded")


def version_fingerprint(folder: Path) -> Fingerprint | None:
    """None for a folder without manifest.json: incomplete (or gone)."""
    try:
        f, m = folder.stat(), (folder / MANIFEST).stat()
    except FileNotFoundError:
        return None
    return f.st_ino, f.st_mtime_ns, m.st_ino, m.st_size, m.st_mtime_ns, m.st_ctime_ns


def snapshot(root: Path) -> Snapshot:
    """Every numbered version folder of every model under root with its fingerprint: directory listings and
    stat calls, nothing read. Folders starting with "." are exports in progress."""
    root = Path(root)
    if not root.is_dir():
        raise ArtifactError(f"{root}: model repository not found")
    seen = {}
    for model_dir in sorted(root.iterdir()):
        if model_dir.name.startswith(".") or not model_dir.is_dir():
            continue
        try:
            folders = version_folders(model_dir)
        except FileNotFoundError:  # removed while we looked
            continue
        if folders:
            seen[model_dir.name] = {n: (folder, version_fingerprint(folder)) for n, folder in sorted(folders.items())}
    return seen


def read_version(name: str, folder: Path) -> ModelVersion:
    """load_version (manifest and graph hashes), and the manifest must name the model of its folder."""
    version = load_version(folder)
    if version.name != name:
        raise ArtifactError(f"{MANIFEST} names model {version.name!r}, but its folder is {name!r}")
    return version


class RepositoryState:
    """What a server has learned of its repository: the folders it saw when it last chose what to serve, and
    the versions that failed to load, each with its fingerprint. A rescan that sees the same fingerprints reads
    nothing; a version that failed is not tried again until its folder changes."""

    def __init__(self, settings: Settings):
        self.root, self.max_versions = settings.repository, settings.max_versions
        self.seen: Snapshot = {}
        self.failed: dict[Key, Fingerprint] = {}

    def changed(self) -> Snapshot | None:
        """The repository now, or None when it is as it was when versions were last chosen."""
        seen = snapshot(self.root)
        return None if seen == self.seen else seen

    def choose(self, seen: Snapshot, current: dict[Key, Loaded],
               load: Callable[[Key, Path, Fingerprint], Loaded]) -> dict[str, dict[int, Loaded]]:  # fmt: skip
        """The newest max_versions versions of each model that load (all when 0), by model and version.

        Newest first: a version of `current` whose fingerprint is unchanged is kept; any other is `load`ed
        unless it failed before with this fingerprint. A failure (ArtifactError) is logged once with its
        reason and counted (any exception, not only ArtifactError: an unreadable file, a graph removed
        mid-rescan), and a changed version that fails leaves the one served in place. Versions below
        the newest that load are not read."""
        limit = self.max_versions or math.inf
        failed, chosen = dict(self.failed), {}
        for name, versions in seen.items():
            kept = {}
            for number, (folder, fingerprint) in sorted(versions.items(), reverse=True):
                if len(kept) >= limit:
                    break
                key = (name, number)
                if fingerprint is None:
                    if key not in _incomplete(self.seen):  # warned once per incomplete folder
                        log.warning("skipping %s: no %s, the version is incomplete", folder, MANIFEST)
                    continue
                served = current.get(key)
                model = served if served is not None and served.fingerprint == fingerprint else None
                if model is None and failed.get(key) != fingerprint:
                    try:
                        model = load(key, folder, fingerprint)
                    except Exception as err:  # one version, whatever broke it, never blocks the others
                        log.error("skipping %s: %s", folder, err, exc_info=not isinstance(err, ArtifactError | OSError))
                        metrics.MODEL_LOADS.labels(name, "failed").inc()
                        failed[key] = fingerprint
                if model is None:
                    model = served  # None, or a changed version failed: the one served stays
                if model is not None:
                    kept[number] = model
            if kept:
                chosen[name] = dict(sorted(kept.items()))
        # A failure is remembered while its folder is there unchanged, whether it was looked at this time or not.
        now = {(name, number): f for name, versions in seen.items() for number, (_, f) in versions.items()}
        self.failed = {key: f for key, f in failed.items() if now.get(key) == f}
        self.seen = seen
        return chosen


def _incomplete(seen: Snapshot) -> set[Key]:
    return {(name, number) for name, versions in seen.items() for number, (_, f) in versions.items() if f is None}


@dataclass(frozen=True)
class OpenedVersion:
    """A version open in ONNX Runtime, not warmed up yet, with its folder's fingerprint from before it was read."""

    artifact: Model
    fingerprint: Fingerprint

    @property
    def manifest(self) -> Manifest:
        return self.artifact.manifest


class OpenedVersions(list):
    """What open_models opened (OpenedVersion), and what it learned of the repository on the way."""

    def __init__(self, opened: list[OpenedVersion], state: RepositoryState):
        super().__init__(opened)
        self.state = state


def open_models(settings: Settings) -> OpenedVersions:
    """The newest max_versions versions of each model (all when 0) that read, check and open (read_version,
    then Model); the others are skipped with one log line naming the file and the reason. ConfigError when
    none is left."""
    state = RepositoryState(settings)

    def open_(key: Key, folder: Path, fingerprint: Fingerprint) -> OpenedVersion:
        return OpenedVersion(Model(read_version(key[0], folder), settings.intra_op_threads), fingerprint)

    chosen = state.choose(snapshot(settings.repository), {}, open_)
    opened = [version for versions in chosen.values() for version in versions.values()]
    if not opened:
        raise no_valid_version(settings.repository)
    return OpenedVersions(opened, state)


class ModelRegistry:
    """Every served version of every model; version 0 means the newest. `models` is replaced whole, on the
    event loop, by `serve`: a request looks it up once and keeps the version it got."""

    def __init__(self, settings: Settings, executor: Executor, state: RepositoryState,
                 refusal: Callable[[Manifest], str | None] = lambda manifest: None):  # fmt: skip
        self.settings, self._executor, self.state = settings, executor, state
        self._refusal = refusal  # why the server cannot serve a version (its message limits are fixed at start), or None
        self.models: dict[str, dict[int, ServedModel]] = {}
        self.names: frozenset[str] = frozenset()

    def warm_up(self, opened: OpenedVersions) -> dict[str, dict[int, ServedModel]]:
        """(In a thread, once the port is bound.) The versions to serve first: those open_models opened,
        warmed up; where one fails its warm-up, the next older version is tried in its place. ConfigError
        when none is left."""
        ready = {(v.manifest.name, v.manifest.version): v for v in opened}

        def load(key: Key, folder: Path, fingerprint: Fingerprint) -> ServedModel:
            if key in ready:
                return self._warm(ready[key].artifact, fingerprint)
            return self._load(key, folder, fingerprint)

        models = self.state.choose(self.state.seen, {}, load)
        if not models:
            raise no_valid_version(self.settings.repository)
        return models

    def rescan(self) -> dict[str, dict[int, ServedModel]] | None:
        """(In a thread, one at a time.) The versions to serve now, or None when that is what is served:
        stat calls only unless a folder's fingerprint changed."""
        seen = self.state.changed()
        if seen is None:
            return None
        current = {(m.name, m.version): m for m in self.all()}
        models = self.state.choose(seen, current, self._load)
        chosen = {(m.name, m.version): m for versions in models.values() for m in versions.values()}
        if chosen.keys() == current.keys() and all(chosen[key] is current[key] for key in current):
            return None
        return models

    def _load(self, key: Key, folder: Path, fingerprint: Fingerprint) -> ServedModel:
        """Read, open and warm up a version found on a rescan, if this server can serve it."""
        version = read_version(key[0], folder)
        refusal = self._refusal(version.manifest)
        if refusal is not None:
            raise ArtifactError(f"{folder / MANIFEST}: {refusal}")
        return self._warm(Model(version, self.settings.intra_op_threads), fingerprint)

    def _warm(self, artifact: Model, fingerprint: Fingerprint) -> ServedModel:
        """Warm an opened version up (the same check as at load, on warmup_rows rows) and put it behind batchers."""
        artifact.check(self.settings.warmup_rows)
        version = artifact.version
        log.info("loaded %s version %d (%s, providers %s)", version.name, version.version, version.manifest.model.kind,
                 artifact.encoder.providers)  # fmt: skip
        metrics.MODEL_LOADS.labels(version.name, "loaded").inc()
        return ServedModel(artifact, self.settings, self._executor, fingerprint)

    def serve(self, models: dict[str, dict[int, ServedModel]]) -> list[ServedModel]:
        """Serve `models` from now on, in one step on the event loop: requests already holding a version keep
        it. Returns the versions that left, for the caller to retire."""
        before = self.all()
        after = [m for versions in models.values() for m in versions.values()]
        started, kept = set(before), set(after)
        for model in after:
            if model not in started:
                model.start()
        self.models, self.names, names_before = models, frozenset(models), self.names
        leaving = [m for m in before if m not in kept]
        for model in leaving:
            log.info("unloading %s version %d once its requests in flight are done", model.name, model.version)
        for name in sorted(names_before - self.names):
            log.warning("model %r is no longer served: none of its versions under %s is left or loads", name,
                        self.settings.repository)  # fmt: skip
        _update_model_info(before, after)
        return leaving

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


def _update_model_info(before: list[ServedModel], after: list[ServedModel]) -> None:
    """One MODEL_INFO child per served graph, one EXPECTED_ANOMALY_RATE child per served version (the rate
    its default threshold holds). Prometheus' multiprocess mode cannot remove a child: there a version that
    left reads 0."""
    for gauge, children in ((metrics.MODEL_INFO, lambda m: {labels: 1.0 for labels in m.info_labels()}),
                            (metrics.EXPECTED_ANOMALY_RATE,
                             lambda m: {(m.name, str(m.version)): m.manifest.thresholds.promised_false_positive_rate})):  # fmt: skip
        served = {labels: value for model in after for labels, value in children(model).items()}
        for labels, value in served.items():
            gauge.labels(*labels).set(value)
        for labels in {labels for model in before for labels in children(model)} - served.keys():
            if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
                gauge.labels(*labels).set(0)
            else:
                gauge.remove(*labels)
