"""Per-feature normalisation, fitted on training rows and stored with the model.

x_model = (x_raw - shift) / scale. Training, export and the service all use this one class: the
checkpoint's config.json and the manifest hold `to_dict()`, and the service applies it to raw rows.
"""

from dataclasses import dataclass

import numpy as np

KINDS = ("standardize", "minmax", "none")


@dataclass(frozen=True)
class Normalizer:
    kind: str
    shift: np.ndarray  # float32 [features]
    scale: np.ndarray  # float32 [features], never zero

    @classmethod
    def fit(cls, kind: str, x: np.ndarray) -> "Normalizer":
        features = x.shape[1]
        if kind == "standardize":
            shift, scale = x.mean(axis=0), x.std(axis=0)
        elif kind == "minmax":
            shift, scale = x.min(axis=0), x.max(axis=0) - x.min(axis=0)
        elif kind == "none":
            shift, scale = np.zeros(features), np.ones(features)
        else:
            raise ValueError(f"unknown normalisation {kind!r}; expected one of {KINDS}")
        # A feature that is constant in training keeps its offset and unit scale.
        scale = np.where(scale > 1e-8, scale, 1.0)
        return cls(kind, shift.astype(np.float32), scale.astype(np.float32))

    def apply(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.shift) / self.scale).astype(np.float32)

    def invert(self, x: np.ndarray) -> np.ndarray:
        return (x * self.scale + self.shift).astype(np.float32)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "shift": self.shift.tolist(), "scale": self.scale.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "Normalizer":
        return cls(d["kind"], np.asarray(d["shift"], np.float32), np.asarray(d["scale"], np.float32))
