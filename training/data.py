"""Training data: the built-in digits, IDX image files, CSV and NPY/NPZ, checked and split.

Every problem with a user's data raises DataError with one line naming it; nothing here prints (what a
loader assumed about a file goes into Dataset.notes, for the run's log).

A CSV's first line is its header, unless it reads as data (vaeserve.tables, the client's rule too). Then
the file has no header, every line is a row and the columns are named x0..x{n-1} (so `--labels x9` names
the tenth).
"""

import csv
import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vaeserve.errors import DataError, listed
from vaeserve.tables import first_line_is_data, is_number

MIN_ROWS = 20  # below this a validation split and a fitted normalisation mean nothing


@dataclass
class Dataset:
    x: np.ndarray  # float32 [rows, features], raw values
    y: np.ndarray | None  # int64 [rows] class indices into label_names
    feature_names: list[str]
    label_names: list[str] | None
    image_shape: tuple[int, int, int] | None  # (channels, height, width) when rows are images
    name: str
    notes: tuple[str, ...] = ()  # what the loader assumed about the file (a CSV without a header), for the log

    @property
    def binary_or_unit(self) -> bool:
        """True when every value lies in [0, 1]: a Bernoulli likelihood fits."""
        return bool(self.x.min() >= 0.0 and self.x.max() <= 1.0)


def load_dataset(source: str, labels: str | None = None) -> Dataset:
    """`digits`, an IDX file or folder, a .csv, .npy or .npz file. `labels` names the label column
    (CSV) or array (NPZ, default `y` when present)."""
    if source == "digits":
        return _check(_digits())
    path = Path(source)
    if not path.exists():
        raise DataError(f"data not found: {source} (expected 'digits', or a CSV, NPY, NPZ or IDX file or folder)")
    name = path.name
    if path.is_dir() or "idx" in name:
        data = _idx(path)
    elif name.endswith(".csv"):
        data = _csv(path, labels)
    elif name.endswith(".npz"):
        data = _npz(path, labels)  # labels None: the array 'y' when there is one
    elif name.endswith(".npy"):
        data = _array_dataset(np.load(path, allow_pickle=False), None, path.stem)
    else:
        raise DataError(f"unknown data format: {source} (expected .csv, .npy, .npz or IDX files)")
    return _check(data)


def _digits() -> Dataset:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    d = load_digits()
    return Dataset(
        x=d.data.astype(np.float32),
        y=d.target.astype(np.int64),
        feature_names=[f"pixel_{r}_{c}" for r in range(8) for c in range(8)],
        label_names=[str(c) for c in range(10)],
        image_shape=(1, 8, 8),
        name="digits",
    )


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
        if zero != 0 or dtype_code != 0x08:
            raise DataError(f"{path}: not an unsigned-byte IDX file (magic {raw[:4].hex()})")
        shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
        body = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    except (OSError, struct.error, EOFError) as err:
        raise DataError(f"{path}: cannot read IDX file ({err})") from None
    if body.size != int(np.prod(shape)):
        raise DataError(f"{path}: IDX header says {shape} but the file holds {body.size} values")
    return body.reshape(shape)


def _idx(path: Path) -> Dataset:
    """An images file (labels found beside it by name), or a folder holding train-images-idx3-ubyte[.gz]."""
    if path.is_dir():
        found = sorted(path.glob("train-images-idx3-ubyte*")) or sorted(path.glob("*images-idx3-ubyte*"))
        if not found:
            raise DataError(f"{path}: no '*images-idx3-ubyte[.gz]' file in this folder")
        path = found[0]
    images = _read_idx(path)
    if images.ndim != 3:
        raise DataError(f"{path}: expected images (n x rows x cols), got shape {images.shape}")
    n, h, w = images.shape
    label_path = path.with_name(path.name.replace("images-idx3", "labels-idx1"))
    y, names = None, None
    if label_path != path and label_path.exists():
        raw = _read_idx(label_path)
        if raw.shape != (n,):
            raise DataError(f"{label_path}: {raw.shape[0]} labels for {n} images")
        y, names = _encode_labels(raw)
    return Dataset(
        x=images.reshape(n, h * w).astype(np.float32),
        y=y,
        feature_names=[f"pixel_{r}_{c}" for r in range(h) for c in range(w)],
        label_names=names,
        image_shape=(1, h, w),
        # the standard MNIST-style names say which split, not which data: name it by its folder then
        name=path.parent.name if path.name.startswith(("train-", "t10k-")) else path.name.split("-")[0],
    )


def _csv(path: Path, label_column: str | None) -> Dataset:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise DataError(f"{path}: empty file")
    notes = ()
    if first_line_is_data(rows[0], rows[1] if len(rows) > 1 else None):
        header, body = [f"x{i}" for i in range(len(rows[0]))], rows
        notes = (f"{path.name} has no header (its first line is data): every line is a row, "
                 f"columns named x0..x{len(header) - 1}",)  # fmt: skip
    else:
        header, body = rows[0], rows[1:]
    if label_column is not None and label_column not in header:
        columns = (f"the file has no header (its first line is data), so its {len(header)} columns are named"
                   if notes else f"its {len(header)} columns are")  # fmt: skip
        raise DataError(f"{path}: no label column {label_column!r} for --labels; {columns} {listed(header)}")
    columns = list(zip(*body)) if body else [() for _ in header]
    if any(len(r) != len(header) for r in body):
        first = 1 if notes else 2  # the file's line number of body[0]
        bad = next(i for i, r in enumerate(body, start=first) if len(r) != len(header))
        raise DataError(f"{path}: line {bad} has {len(body[bad - first])} fields, the first line {len(header)}")
    features, names, y, label_names = [], [], None, None
    for name, values in zip(header, columns):
        if name == label_column:
            y, label_names = _encode_labels(np.asarray(values))
            continue
        try:
            features.append(np.asarray(values, dtype=np.float64))
        except ValueError:
            bad = next(v for v in values if not is_number(v))
            raise DataError(f"{path}: column {name!r} is not numeric (value {bad!r}); use --labels for a label column") from None
        names.append(name)
    if not features:
        raise DataError(f"{path}: no feature columns")
    x = np.stack(features, axis=1)
    return Dataset(x.astype(np.float32), y, names, label_names, None, path.stem, notes)


def _npz(path: Path, label_key: str | None) -> Dataset:
    try:
        arrays = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read NPZ file ({err})") from None
    if "X" not in arrays and "x" not in arrays:
        raise DataError(f"{path}: no array 'X' (holds {', '.join(arrays.files)})")
    x = arrays["X"] if "X" in arrays else arrays["x"]
    if label_key is not None and label_key not in arrays:  # named with --labels: it must be there
        raise DataError(f"{path}: no label array {label_key!r} for --labels (holds {', '.join(arrays.files)})")
    key = label_key or "y"
    y = arrays[key] if key in arrays else None
    return _array_dataset(x, y, path.stem)


def _array_dataset(x: np.ndarray, y: np.ndarray | None, name: str) -> Dataset:
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{name}: features are not numeric (dtype {x.dtype})")
    image_shape = None
    if x.ndim == 3:  # n x height x width images
        image_shape = (1, *x.shape[1:])
    elif x.ndim != 2:
        raise DataError(f"{name}: expected a 2-D array of rows x features, got shape {x.shape}")
    x = x.reshape(x.shape[0], -1)
    labels, names = (None, None) if y is None else _encode_labels(np.asarray(y))
    if labels is not None and labels.shape[0] != x.shape[0]:
        raise DataError(f"{name}: {labels.shape[0]} labels for {x.shape[0]} rows")
    return Dataset(x.astype(np.float32), labels, [f"f{i}" for i in range(x.shape[1])], names, image_shape, name)


def _encode_labels(raw: np.ndarray) -> tuple[np.ndarray, list[str]]:
    classes, index = np.unique(raw.astype(str) if raw.dtype.kind in "US" else raw, return_inverse=True)
    return index.astype(np.int64), [str(c) for c in classes]


def _check(data: Dataset) -> Dataset:
    x = data.x
    if x.shape[0] < MIN_ROWS:
        raise DataError(f"{data.name}: {x.shape[0]} rows; at least {MIN_ROWS} are needed to train and validate")
    bad = ~np.isfinite(x)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise DataError(
            f"{data.name}: {int(bad.sum())} NaN/Inf values, the first in row {row}, feature {data.feature_names[col]!r}"
        )
    return data


def split(data: Dataset, val_fraction: float, seed: int, calibration_fraction: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shuffled train, validation and calibration row indices (calibration empty at fraction 0)."""
    order = np.random.default_rng(seed).permutation(data.x.shape[0])
    n_val = max(1, int(round(val_fraction * len(order))))
    n_cal = max(1, int(round(calibration_fraction * len(order)))) if calibration_fraction > 0 else 0
    return np.sort(order[n_val + n_cal :]), np.sort(order[:n_val]), np.sort(order[n_val : n_val + n_cal])
