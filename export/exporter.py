"""`export_checkpoint`: checkpoint -> validated model version in a repository.

Graphs are written into a hidden temp folder inside the model's folder, checked against torch in
ONNX Runtime, scored for thresholds; manifest.json is written last, atomically, and the folder is
renamed into place. On any failure the temp folder is removed: no complete version is left.
"""

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
from vaeserve.errors import ArtifactError, ConfigError, ExportError
from vaeserve.export.calibrate import calibrate
from vaeserve.export.graphs import OPSET, describe, export_graph
from vaeserve.export.manifest import SCHEMA_VERSION, file_sha256, write_manifest
from vaeserve.export.repository import NAME_PATTERN, ModelVersion, load_version, next_version
from vaeserve.export.validate import BATCH_SIZES, TOLERANCE, check_parity, max_abs_diff, parity_batches
from vaeserve.service.runtime import Graph
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
) -> ModelVersion:
    """Export a checkpoint as `repository/name/version`; the next free version when none is given."""
    started = time.perf_counter()
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    if not NAME_PATTERN.fullmatch(name):
        raise ConfigError(f"model name {name!r}: use letters, digits, '_', '-' and '.', starting with a letter or digit")
    if version is not None and version < 1:
        raise ConfigError(f"--version must be a positive integer, got {version}")
    model_dir = Path(repository) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    version = version or next_version(model_dir)
    final = model_dir / str(version)
    if final.exists():
        raise ExportError(f"{final} already exists; versions are never overwritten (omit --version for the next one)")

    tmp = Path(tempfile.mkdtemp(prefix=f".export-{version}-", dir=model_dir))
    try:
        manifest = _build(ckpt, tmp, name, version, tolerance, batch_sizes, exporter)
        write_manifest(tmp, manifest)
        try:
            os.rename(tmp, final)  # fails when another export took this number meanwhile
        except OSError as err:
            raise ExportError(f"{final}: cannot move the export into place ({err.strerror})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s as %s in %.2f s", ckpt.path, final, time.perf_counter() - started)
    return load_version(final)


def _build(ckpt: Checkpoint, folder: Path, name: str, version: int, tolerance, batch_sizes, exporter) -> dict:
    config, data, model = ckpt.model_config, ckpt.data, ckpt.model
    model.eval()
    x, labels, class_prior = _validation_rows(ckpt)

    specs = describe(config)
    modules = {"encoder": model.encoder, "decoder": model.decoder}
    for spec in specs:
        export_graph(modules[spec.name], spec, folder / spec.file, exporter)
    onnxruntime.set_default_logger_severity(3)  # the CUDA provider failing to load on a GPU-less box is expected
    graphs = {spec.name: Graph(folder / spec.file) for spec in specs}

    batches = parity_batches(x, labels, model.encoder, batch_sizes)
    diffs = {}
    for i, spec in enumerate(specs):
        diffs |= max_abs_diff(modules[spec.name], graphs[spec.name], spec, [b[i] for b in batches])
    check_parity(diffs, tolerance)

    thresholds = calibrate(x, graphs["encoder"], graphs["decoder"], config.likelihood,
                           class_prior if config.conditional else None)
    return {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "version": version,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": {"kind": config.kind, "arch": config.arch, "latent_dim": config.latent_dim, "likelihood": config.likelihood},
        "input": {
            "features": config.input_dim,
            "dtype": "float32",
            "shape": [-1, config.input_dim],
            "image_shape": list(data.image_shape) if data.image_shape else None,
            "feature_names": list(data.feature_names),
        },
        "labels": {"names": list(data.label_names), "prior": class_prior} if config.conditional else None,
        "normalization": data.normalization.to_dict(),
        "graphs": {
            spec.name: {
                "file": spec.file,
                "sha256": file_sha256(folder / spec.file),
                "inputs": [t.to_dict() for t in spec.inputs],
                "outputs": [t.to_dict() for t in spec.outputs],
            }
            for spec in specs
        },
        "opset": OPSET,
        "exporter": exporter,
        "producer": {
            "vaeserve": vaeserve.__version__,
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
        "parity": {"batch_sizes": list(batch_sizes), "tolerance": tolerance, "max_abs_diff": diffs},
        "source_checkpoint": {"path": str(Path(ckpt.path).resolve()), "sha256": ckpt.sha256()},
        "thresholds": thresholds,
    }


def _validation_rows(ckpt: Checkpoint) -> tuple[np.ndarray, np.ndarray | None, list[float] | None]:
    """Normalised held-out rows, their one-hot labels (CVAE) and the class prior (CVAE)."""
    config, data = ckpt.model_config, ckpt.data
    try:
        raw, y = ckpt.validation_rows()
    except (OSError, KeyError, ValueError) as err:
        raise ArtifactError(f"{ckpt.path}: cannot read the held-out validation rows ({err})") from None
    if raw.ndim != 2 or raw.shape[1] != config.input_dim or raw.shape[0] == 0:
        raise ArtifactError(f"{ckpt.path}: validation rows have shape {raw.shape}, the model takes {config.input_dim} features")
    x = data.normalization.apply(raw.astype(np.float32))
    if not config.conditional:
        return x, None, None
    classes = config.num_classes
    if not data.label_names or len(data.label_names) != classes:
        raise ArtifactError(f"{ckpt.path}: a CVAE with {classes} classes needs {classes} label names in config.json")
    prior = data.class_prior or [1.0 / classes] * classes  # uniform when training recorded none
    index = y.astype(np.int64) if y is not None else np.arange(x.shape[0]) % classes
    return x, np.eye(classes, dtype=np.float32)[index], [float(p) for p in prior]
