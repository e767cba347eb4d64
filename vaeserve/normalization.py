"""What a raw row is to a model: its normalisation and its support, both fitted on training rows and
stored with the model (the checkpoint's config.json and the manifest hold their `to_dict()`).

Normalisation: x_model = (x_raw - shift) / scale, clipped to [-clip, clip] when clip > 0: one extreme value
in a table (a z-score of 10^8 in a feature nearly constant in training) then reaches the network as a
large but finite input, and float32 graphs agree with torch on it.

Support: per feature, the raw interval [low, high] the model was trained on. The network only ever sees
rows inside that box, where it was fitted and where float32 stays finite; a row outside is scored as the
row brought back into the box plus a penalty that grows with the distance (see vaeserve.scoring.Scorer):
a value far outside is flagged by its score, one just past the range as its score says.
"""

import math
from dataclasses import dataclass

import numpy as np

KINDS = ("standardize", "minmax", "none")


def _vector(d: dict, key: str, features: int | None) -> np.ndarray:
    """d[key] as a float32 vector, every value finite; `features` checks its length."""
    value = d.get(key)
    if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{key}: expected a list of numbers")
    if features is not None and len(value) != features:
        raise ValueError(f"{key}: {len(value)} values for {features} features")
    array = np.asarray(value, np.float64)
    if not np.isfinite(array).all() or not np.isfinite(array.astype(np.float32)).all():
        raise ValueError(f"{key}: every value must be finite in float32")
    return array.astype(np.float32)


def _check_keys(d, expected: set[str], optional: set[str] = frozenset()) -> None:
    if not isinstance(d, dict):
        raise ValueError("expected an object")
    missing, unknown = expected - set(d), set(d) - expected - optional
    if missing:
        raise ValueError(f"{sorted(missing)[0]}: missing")
    if unknown:
        raise ValueError(f"{sorted(unknown)[0]}: unknown key")


@dataclass(frozen=True)
class Normalizer:
    kind: str
    shift: np.ndarray  # float32 [features]
    scale: np.ndarray  # float32 [features], > 0
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
    def from_dict(cls, d: dict, features: int | None = None) -> "Normalizer":
        """The inverse of to_dict; ValueError naming the key for anything that cannot normalise a row."""
        _check_keys(d, {"kind", "shift", "scale"}, {"clip"})
        if d["kind"] not in KINDS:
            raise ValueError(f"kind: {d['kind']!r} is not one of {', '.join(KINDS)}")
        shift = _vector(d, "shift", features)
        scale = _vector(d, "scale", len(shift))
        if not (scale > 0).all():
            raise ValueError(f"scale: every value must be > 0 (feature {int(np.argmin(scale > 0))} is {scale[np.argmin(scale > 0)]:g})")
        clip = d.get("clip", 0.0)
        if not isinstance(clip, (int, float)) or isinstance(clip, bool) or not math.isfinite(clip) or clip < 0:
            raise ValueError(f"clip: expected a finite number >= 0, got {clip!r}")
        return cls(d["kind"], shift, scale, float(clip))


@dataclass(frozen=True)
class Support:
    """The raw values a model was trained on: feature d within [low[d], high[d]]."""

    low: np.ndarray  # float32 [features]
    high: np.ndarray  # float32 [features]

    @classmethod
    def fit(cls, x: np.ndarray, shared: bool = False) -> "Support":
        """The range of rows x [rows, features]: per feature, or one range for every feature when
        `shared` (image pixels, which share one intensity scale: a corner pixel never lit in training
        is still a pixel, and the likelihood judges its value)."""
        x = np.asarray(x, np.float32)
        if shared:
            return cls(np.full(x.shape[1], x.min(), np.float32), np.full(x.shape[1], x.max(), np.float32))
        return cls(x.min(axis=0), x.max(axis=0))

    def clip(self, x: np.ndarray) -> np.ndarray:
        """x brought back into the support: each value moved to the nearest end of its interval (NaN to
        the high end, so that it too is a value the network has seen)."""
        return np.fmax(self.low, np.fmin(x, self.high))

    def to_dict(self) -> dict:
        return {"low": self.low.tolist(), "high": self.high.tolist()}

    @classmethod
    def from_dict(cls, d: dict, features: int | None = None) -> "Support":
        _check_keys(d, {"low", "high"})
        low = _vector(d, "low", features)
        high = _vector(d, "high", len(low))
        if not (low <= high).all():
            bad = int(np.argmax(low > high))
            raise ValueError(f"low: feature {bad} has low {low[bad]:g} above high {high[bad]:g}")
        return cls(low, high)
