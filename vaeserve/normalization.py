"""Per-feature normalisation, fitted on training rows and stored with the model.

x_model = (x_raw - shift) / scale, clipped to [-clip, clip] when clip > 0: one extreme value in a
table (a z-score of 10^8 in a feature nearly constant in training) then reaches the network as a large
but finite input, and float32 graphs agree with torch on it. Training, export and the service all use this one class: the
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
    clip: float = 0.0  # |x_model| is clipped to this; 0 = no clipping

    @classmethod
    def fit(cls, kind: str, x: np.ndarray, clip: float = 0.0) -> "Normalizer":
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
        return cls(kind, shift.astype(np.float32), scale.astype(np.float32), float(clip))

    def apply(self, x: np.ndarray) -> np.ndarray:
        x = ((x - self.shift) / self.scale).astype(np.float32)
        return np.clip(x, -self.clip, self.clip) if self.clip > 0 else x

    def invert(self, x: np.ndarray) -> np.ndarray:
        return (x * self.scale + self.shift).astype(np.float32)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "shift": self.shift.tolist(), "scale": self.scale.tolist(), "clip": self.clip}

    @classmethod
    def from_dict(cls, d: dict) -> "Normalizer":
        return cls(d["kind"], np.asarray(d["shift"], np.float32), np.asarray(d["scale"], np.float32), float(d.get("clip", 0.0)))
