"""`export_checkpoint`: checkpoint -> validated model version in a repository.

Graphs are written into a hidden temp folder inside the model's folder: the encoder and decoder, checked
against torch in ONNX Runtime, then the score graph composed from them, checked against the NumPy scorer
on them; the held-out rows are scored for thresholds; manifest.json is written last, atomically, and the
folder is renamed into place. On any failure the temp folder is removed: no complete version is left.
"""

import dataclasses
import datetime
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch

import vaeserve
from vaeserve import scoring
from vaeserve.artifact.manifest import (
    NAME_PATTERN, GraphInfo, InputInfo, Manifest, ModelInfo, NeighbourInfo, Parity, ScoringInfo, file_sha256,
    write_manifest,
)  # fmt: skip
from vaeserve.artifact.repository import ModelVersion, load_version, next_version
from vaeserve.artifact.runtime import Graph, neighbours_callable, scorer
from vaeserve.errors import ArtifactError, ConfigError, ExportError
from vaeserve.export.calibrate import MAX_ROWS, TARGET_FALSE_POSITIVE_RATE, calibrate
from vaeserve.export.graphs import (
    OPSET, build_neighbour_graph, describe, describe_neighbours, describe_score, export_graph, write_score_graph,
)  # fmt: skip
from vaeserve.export.validate import (
    BATCH_SIZES, SCORE_TOLERANCE, TOLERANCE, check_parity, max_abs_diff, neighbour_parity, parity_batches, score_parity,
)  # fmt: skip
from vaeserve.training.checkpoint import Checkpoint, load_checkpoint

log = logging.getLogger(__name__)


def export_checkpoint(
    checkpoint: str | Path | Checkpoint,
    repository: str | Path,
    name: str,
    version: int | None = None,
    *,
    tolerance: float = TOLERANCE,
    batch_sizes: tuple[int, ...] = BATCH_SIZES,
    exporter: str = "torchscript",
    score_tolerance: float = SCORE_TOLERANCE,
    elbo_samples: int = scoring.ELBO_SAMPLES,
    neighbours: int = scoring.NEIGHBOURS_K,
    target_false_positive_rate: float = TARGET_FALSE_POSITIVE_RATE,
) -> ModelVersion:
    """Export a checkpoint as `repository/name/version`; the next free version when none is given.
    `tolerance`: max abs difference of the encoder and decoder from torch; `score_tolerance`: relative
    difference of the score graph from the NumPy scorer (validate.score_parity); `elbo_samples`: posterior
    samples of the ELBO this version scores with (recorded in the manifest, baked into the score graph);
    `neighbours`: k of the combined score's kNN part (0: -ELBO is the default score); `target_false_positive_rate`:
    the rate the default threshold holds on normal rows (conformal, vaeserve.conformal)."""
    started = time.perf_counter()
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    if not NAME_PATTERN.fullmatch(name):
        raise ConfigError(f"model name {name!r}: use letters, digits, '_', '-' and '.', starting with a letter or digit")
    if version is not None and version < 1:
        raise ConfigError(f"--version must be a positive integer, got {version}")
    if elbo_samples < 1:
        raise ConfigError(f"--elbo-samples must be at least 1, got {elbo_samples}")
    if neighbours < 0:
        raise ConfigError(f"--neighbours must be 0 (none) or more, got {neighbours}")
    if not 0 < target_false_positive_rate < 1:
        raise ConfigError(f"--target-fpr must be in (0, 1), got {target_false_positive_rate}")
    model_dir = Path(repository) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    version = version or next_version(model_dir)
    final = model_dir / str(version)
    if final.exists():
        raise ExportError(f"{final} already exists; versions are never overwritten (omit --version for the next one)")

    tmp = Path(tempfile.mkdtemp(prefix=f".export-{version}-", dir=model_dir))
    try:
        write_manifest(tmp, _build(ckpt, tmp, name, version, tolerance, batch_sizes, exporter, score_tolerance, elbo_samples,
                                   neighbours, target_false_positive_rate))  # fmt: skip
        try:
            os.rename(tmp, final)  # fails when another export took this number meanwhile
        except OSError as err:
            raise ExportError(f"{final}: cannot move the export into place ({err.strerror})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s as %s in %.2f s", ckpt.path, final, time.perf_counter() - started)
    return load_version(final)


def _build(ckpt: Checkpoint, folder: Path, name: str, version: int, tolerance, batch_sizes, exporter,
           score_tolerance, elbo_samples, k, target) -> Manifest:  # fmt: skip
    config, data, model = ckpt.model_config, ckpt.data, ckpt.model
    model.eval()
    if data.support is None:
        raise ArtifactError(f"{ckpt.path}: config.json records no data support (trained by an older vaeserve); "
                            "train it again to export it")  # fmt: skip
    raw, labels, class_prior = _validation_rows(ckpt)

    specs = describe(config)
    modules = {"encoder": model.encoder, "decoder": model.decoder}
    graphs, entries = {}, {}
    onnxruntime.set_default_logger_severity(3)  # the CUDA provider failing to load on a GPU-less box is expected
    for spec in specs:
        export_graph(modules[spec.name], spec, folder / spec.file, exporter)
        entries[spec.name] = GraphInfo(spec.file, file_sha256(folder / spec.file), spec.inputs, spec.outputs)
        graphs[spec.name] = Graph(folder / spec.file, entries[spec.name])

    batches = parity_batches(data.normalization.apply(raw), labels, model.encoder, batch_sizes)
    diffs = {}
    for i, spec in enumerate(specs):
        diffs |= max_abs_diff(modules[spec.name], graphs[spec.name], spec, [b[i] for b in batches])
    check_parity(diffs, tolerance)

    scoring_info = ScoringInfo(config.likelihood, elbo_samples, scoring.IW_SAMPLES, scoring.SEED,
                               tuple(class_prior) if config.conditional else None)  # fmt: skip
    # The score graph: encoder and decoder as exported, with this version's scoring settings baked in.
    score_spec = describe_score(config)
    write_score_graph(folder / entries["encoder"].file, folder / entries["decoder"].file, score_spec,
                      folder / score_spec.file, config.likelihood, config.latent_dim, scoring_info.elbo_samples,
                      scoring_info.seed)  # fmt: skip
    entries["score"] = GraphInfo(score_spec.file, file_sha256(folder / score_spec.file), score_spec.inputs, score_spec.outputs)
    graphs["score"] = Graph(folder / score_spec.file, entries["score"])
    rows = scorer(graphs["encoder"], graphs["decoder"], data.normalization, data.support, scoring_info, graphs["score"])
    try:
        score_check = score_parity(rows, raw[:MAX_ROWS], None if labels is None else labels[:MAX_ROWS], batch_sizes,
                                   score_tolerance)  # fmt: skip
    except ExportError as err:
        # Its float32 likelihood terms are not close enough for this model (Gaussian terms of both signs
        # cancel in the sum; float64 terms cost more than the NumPy path saves): score on the NumPy path.
        log.warning("%s; the version is exported without its score graph and scores on the NumPy path", err)
        del entries["score"], graphs["score"]  # the session first, then its file
        (folder / score_spec.file).unlink()
        score_check = None
        rows = scorer(graphs["encoder"], graphs["decoder"], data.normalization, data.support, scoring_info)

    held = _calibration_rows(ckpt)
    scoring_info, neighbour_check = _combined_score(ckpt, folder, rows, raw, held, scoring_info, entries, graphs, k,
                                                    batch_sizes)  # fmt: skip
    rows = scorer(graphs["encoder"], graphs["decoder"], data.normalization, data.support, scoring_info, graphs.get("score"),
                  graphs.get("neighbours"))  # fmt: skip
    calibrated_on = "calibration rows held out of training and early stopping"
    if held is None:
        log.warning("%s holds no calibration rows (trained by an older vaeserve): the thresholds are calibrated on the "
                    "validation rows, which chose the epoch, so the false-positive rate may run above target", ckpt.path)  # fmt: skip
        held, calibrated_on = raw, "validation rows of the checkpoint (it holds no calibration rows)"
    return Manifest(
        name=name,
        version=version,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        model=ModelInfo(config.kind, config.arch, config.latent_dim),
        input=InputInfo(config.input_dim, tuple(data.feature_names), tuple(data.image_shape) if data.image_shape else None),
        labels=tuple(data.label_names) if config.conditional else None,
        label_column=data.label_column if config.conditional else None,
        normalization=data.normalization,
        support=data.support,
        scoring=scoring_info,
        encoder=entries["encoder"],
        decoder=entries["decoder"],
        score=entries.get("score"),
        neighbours=entries.get("neighbours"),
        opset=OPSET,
        exporter=exporter,
        producer={"vaeserve": vaeserve.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
                  "onnxruntime": onnxruntime.__version__},  # fmt: skip
        parity=Parity(tuple(batch_sizes), tolerance, diffs, score_check, neighbour_check),
        source_checkpoint={"path": str(Path(ckpt.path).resolve()), "sha256": ckpt.sha256()},
        thresholds=calibrate(held, rows, scoring_info.iw_samples, target=target, calibrated_on=calibrated_on),
    )


def _combined_score(ckpt: Checkpoint, folder: Path, rows: scoring.Scorer, raw: np.ndarray, held: np.ndarray | None,
                    info: ScoringInfo, entries: dict, graphs: dict, k: int, batch_sizes) -> tuple[ScoringInfo, object]:  # fmt: skip
    """The neighbour graph over the checkpoint's reference rows and the validation rows, checked against
    NumPy on the calibration rows `held`, and the combination of -ELBO and knn standardised on the validation
    rows (which chose the epoch but not the thresholds), each scored leave-one-out. Without calibration rows
    the validation rows calibrate, so they stay out of the reference. Without k or reference rows (an older
    checkpoint), or when the graph misses its parity: the scoring info as it was, -ELBO the default score."""
    training = None if k == 0 else ckpt.reference_rows()
    if training is None:
        if k:
            log.warning("%s holds no reference rows (trained by an older vaeserve): -ELBO is the default score", ckpt.path)
        return info, None
    if training.ndim != 2 or training.shape[1] != ckpt.model_config.input_dim or len(training) == 0:
        raise ArtifactError(f"{ckpt.path}: reference rows have shape {training.shape}; the model takes "
                            f"{ckpt.model_config.input_dim} features")  # fmt: skip
    validation = raw[:MAX_ROWS]
    pooled = np.concatenate([training, validation]) if held is not None else training.astype(np.float32)
    kept = np.arange(len(pooled))
    budget = scoring.reference_budget(pooled.shape[1])
    if len(pooled) > budget:
        kept = np.sort(np.random.default_rng(scoring.SEED).choice(len(pooled), budget, replace=False))
    reference = rows.neighbour_input(pooled[kept])
    if len(reference) <= k:
        raise ArtifactError(f"{ckpt.path}: {len(reference)} reference rows; {k} neighbours need more")
    spec = describe_neighbours(ckpt.model_config)
    onnx.save(build_neighbour_graph(reference, k, spec), str(folder / spec.file))
    entries["neighbours"] = GraphInfo(spec.file, file_sha256(folder / spec.file), spec.inputs, spec.outputs)
    graphs["neighbours"] = Graph(folder / spec.file, entries["neighbours"])
    checked = validation if held is None else held[:MAX_ROWS]  # rows outside the reference
    try:
        check = neighbour_parity(neighbours_callable(graphs["neighbours"]), rows.neighbour_input(checked), reference, k,
                                 batch_sizes)  # fmt: skip
    except ExportError as err:
        log.warning("%s; the version is exported without its neighbour graph: -ELBO is the default score", err)
        del entries["neighbours"], graphs["neighbours"]
        (folder / spec.file).unlink()
        return info, None
    info = dataclasses.replace(info, neighbours=NeighbourInfo(k, len(reference)))
    s = rows.score(validation, None)  # label-free, as calibration scores
    # Each validation row's place in the reference (-1 if it was not kept): left out of its own distance.
    place = np.full(len(training) + len(validation), -1)
    place[kept] = np.arange(len(kept))
    s.knn = scoring.neighbour_distance(rows.neighbour_input(validation), reference, k, exclude=place[len(training):])
    return dataclasses.replace(info, combination=scoring.Combination.fit(s)), check


def _calibration_rows(ckpt: Checkpoint) -> np.ndarray | None:
    """The checkpoint's calibration rows; None for one trained before they were held out."""
    held = ckpt.calibration_rows()
    if held is None:
        return None
    x = held[0]
    if x.ndim != 2 or x.shape[1] != ckpt.model_config.input_dim or len(x) == 0:
        raise ArtifactError(f"{ckpt.path}: calibration rows have shape {x.shape}, the model takes {ckpt.model_config.input_dim} features")
    return x.astype(np.float32)


def _validation_rows(ckpt: Checkpoint) -> tuple[np.ndarray, np.ndarray | None, list[float] | None]:
    """Raw held-out rows, their one-hot labels (CVAE) and the class prior (CVAE)."""
    config, data = ckpt.model_config, ckpt.data
    raw, y = ckpt.validation_rows()  # ArtifactError naming the file when it cannot be read
    if raw.ndim != 2 or raw.shape[1] != config.input_dim or raw.shape[0] == 0:
        raise ArtifactError(f"{ckpt.path}: validation rows have shape {raw.shape}, the model takes {config.input_dim} features")
    raw = raw.astype(np.float32)
    if not config.conditional:
        return raw, None, None
    classes = config.num_classes
    if not data.label_names or len(data.label_names) != classes:
        raise ArtifactError(f"{ckpt.path}: a CVAE with {classes} classes needs {classes} label names in config.json")
    prior = data.class_prior or [1.0 / classes] * classes  # uniform when training recorded none
    index = y.astype(np.int64) if y is not None else np.arange(raw.shape[0]) % classes
    return raw, np.eye(classes, dtype=np.float32)[index], [float(p) for p in prior]
