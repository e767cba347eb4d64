"""Checkpoint directory: everything needed to rebuild a model and its data schema, and nothing else.

    weights.pt       model state_dict (the best epoch by validation ELBO)
    config.json      {"model": ModelConfig, "data": DataSchema, "train": training settings}
    metrics.json     train/validation ELBO, reconstruction, KL, active units, log-likelihood estimates, and
                     whether the run ended before the model did (still_improving, warmup_finished, warnings)
    validation.npz   held-out rows (raw x, y) the model never trained on; they chose the best epoch:
                     evaluation, parity checks and the combined score's standardisation
    calibration.npz  held-out rows (raw x, y) that neither trained the model nor chose its epoch: the export's
                     conformal calibration (vaeserve.conformal)
    reference.npz    raw training rows (x; at most scoring.MAX_REFERENCE_ROWS, a seeded subsample): the
                     neighbours of the combined score
    sample_rows.csv  a few of those rows with their feature names: an input to try the served model with
    plots/*.png      written by the training run (thresholds_<name>_v<version>.png by `vaeserve export`)
"""

import hashlib
import json
import os
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from vaeserve.errors import ArtifactError, cut
from vaeserve.normalization import Normalizer, Support
from vaeserve.training.model import ModelConfig, build_model

WEIGHTS, CONFIG, METRICS, VALIDATION = "weights.pt", "config.json", "metrics.json", "validation.npz"
CALIBRATION, REFERENCE = "calibration.npz", "reference.npz"
SAMPLE_ROWS, PLOTS = "sample_rows.csv", "plots"


@dataclass
class DataSchema:
    """What a row is: its features, labels, normalisation and support. Travels into the export manifest."""

    name: str
    source: str
    feature_names: list[str]
    normalization: Normalizer
    image_shape: tuple[int, int, int] | None = None
    label_names: list[str] | None = None
    class_prior: list[float] | None = None  # training-label frequencies, in label_names order
    support: Support | None = None  # raw range of the training data; None in checkpoints of vaeserve < 0.2
    label_column: str | None = None  # the CSV column (or NPZ array) the labels came from, when one was named

    def to_dict(self) -> dict:
        d = asdict(self)
        d["normalization"] = self.normalization.to_dict()
        d["support"] = None if self.support is None else self.support.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DataSchema":
        d = dict(d, normalization=Normalizer.from_dict(d["normalization"]))
        if d.get("support") is not None:
            d["support"] = Support.from_dict(d["support"])
        if d.get("image_shape") is not None:
            d["image_shape"] = tuple(d["image_shape"])
        return cls(**d)


@dataclass
class Checkpoint:
    path: Path
    model: torch.nn.Module
    model_config: ModelConfig
    data: DataSchema
    train: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)

    def validation_rows(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Held-out raw rows and their labels (None for unlabelled data)."""
        return self._rows(VALIDATION)

    def calibration_rows(self) -> tuple[np.ndarray, np.ndarray | None] | None:
        """Raw calibration rows and their labels; None for a checkpoint trained before they were held out."""
        return self._rows(CALIBRATION) if (self.path / CALIBRATION).is_file() else None

    def reference_rows(self) -> np.ndarray | None:
        """Raw training rows for the neighbours; None for a checkpoint trained before they were kept."""
        return self._rows(REFERENCE)[0] if (self.path / REFERENCE).is_file() else None

    def _rows(self, name: str) -> tuple[np.ndarray, np.ndarray | None]:
        try:
            with np.load(self.path / name, allow_pickle=False) as f:
                return f["x"], (f["y"] if "y" in f.files else None)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:  # truncated, not an npz, no x
            raise ArtifactError(f"{self.path / name}: cannot be read ({cut(str(err) or type(err).__name__, 200)}); "
                                "train the model again") from None

    def sha256(self) -> str:
        """Hash of the weights and config: names exactly the model an export came from."""
        digest = hashlib.sha256()
        for name in (WEIGHTS, CONFIG):
            digest.update((self.path / name).read_bytes())
        return digest.hexdigest()


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_json(path: Path, obj: dict) -> None:
    _write_atomic(path, lambda p: p.write_text(json.dumps(obj, indent=2) + "\n"))


def save_checkpoint(path: Path, model: torch.nn.Module, data: DataSchema, train: dict, metrics: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    _write_atomic(path / WEIGHTS, lambda p: torch.save(model.state_dict(), p))
    write_json(path / CONFIG, {"model": model.config.to_dict(), "data": data.to_dict(), "train": train})
    write_json(path / METRICS, metrics)


def save_rows(path: Path, name: str, x: np.ndarray, y: np.ndarray | None = None) -> None:
    """Raw rows (and labels) as `name` (VALIDATION, CALIBRATION or REFERENCE) in the checkpoint."""
    arrays = {"x": x} if y is None else {"x": x, "y": y}
    path.mkdir(parents=True, exist_ok=True)
    _write_atomic(path / name, lambda p: np.savez(open(p, "wb"), **arrays))


def save_sample_rows(path: Path, x: np.ndarray, feature_names: list[str]) -> None:
    header = ",".join(feature_names)
    _write_atomic(path / SAMPLE_ROWS, lambda p: np.savetxt(p, x, delimiter=",", header=header, comments="", fmt="%.9g"))


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    for name in (WEIGHTS, CONFIG):
        if not (path / name).is_file():
            raise ArtifactError(f"{path} is not a checkpoint: {name} is missing")
    try:
        config = json.loads((path / CONFIG).read_text())
        model_config = ModelConfig(**config["model"])
        data = DataSchema.from_dict(config["data"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ArtifactError(f"{path / CONFIG}: cannot rebuild the model ({err})") from None
    model = build_model(model_config)
    try:
        model.load_state_dict(torch.load(path / WEIGHTS, map_location="cpu", weights_only=True))
    except (RuntimeError, OSError) as err:
        raise ArtifactError(f"{path / WEIGHTS}: does not match config.json ({err})") from None
    model.eval()
    metrics_path = path / METRICS
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    return Checkpoint(path, model, model_config, data, config.get("train", {}), metrics)
