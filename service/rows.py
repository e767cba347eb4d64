"""The input files of `vaeserve client`: rows for a model, read from CSV by column name.

A CSV's header is matched to the model's feature names (GetModel's `feature_names`), in any order; a
missing or unknown column is one DataError naming them and what the model takes. The label column
(`label_column`, `label` by default) holds a CVAE's label names; an unconditional model skips it. A CSV
whose first line is data has no header, by the rule training reads CSVs with (vaeserve.tables): its
columns are named x0..x{n-1} as training names them, so a model trained on a headerless file matches them
by name (its label column too, e.g. --label-column x9); for a model with other names they are taken in
its order when there are exactly as many as it has features (with a note saying so), and refused
otherwise. So is a header that only numbers the columns (0..n-1 or 1..n, as pandas writes unnamed ones). NPY and NPZ
files have no names: their columns are taken in order, and their width must match. Latent rows (decode)
are taken by position; a header there is skipped, but for the label column.
"""

import csv
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vaeserve.errors import DataError, cut, listed
from vaeserve.tables import first_line_is_data, is_number, numbers_columns

NAMES = 8  # names an error lists before shortening


@dataclass
class Rows:
    x: np.ndarray  # [N, width] float32, columns in the model's order
    labels: list[str] | None  # a CVAE's labels from the label column; None when the file has none
    notes: list[str] = field(default_factory=list)  # what the reader decided, for the user to read (stderr)


def read_rows(path: Path, names: Sequence[str], *, label_column: str = "label", conditional: bool = False,
              by_name: bool = True) -> Rows:  # fmt: skip
    """The rows of a .csv, .npy or .npz file for a model whose columns are `names` (its feature names;
    with `by_name` False, positions only: latent dimensions)."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix in (".npy", ".npz"):
        return Rows(_width(path, _array(path), names), None)
    return _csv(path, list(names), label_column, conditional, by_name)


def _array(path: Path) -> np.ndarray:
    try:
        if path.suffix == ".npy":
            array = np.load(path, allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as data:
                array = data["x"] if "x" in data else data[data.files[0]]
    except (OSError, ValueError, IndexError) as err:
        raise DataError(f"{path}: cannot read it as {path.suffix[1:].upper()} ({err})") from None
    array = np.atleast_2d(np.asarray(array, np.float32))
    return array.reshape(len(array), -1)


def _width(path: Path, x: np.ndarray, names: list[str]) -> np.ndarray:
    if x.shape[1] != len(names):
        raise DataError(f"{path}: {x.shape[1]} columns; the model takes {len(names)}: {listed(names, NAMES)}")
    return x


def _csv(path: Path, names: list[str], label_column: str, conditional: bool, by_name: bool) -> Rows:
    header, second, skip = _first_lines(path)
    notes = []
    if first_line_is_data(header, second):
        header, skip = [f"x{i}" for i in range(len(header))], 0  # training's names for a headerless file
        if not (by_name and set(names) <= set(header)):  # a model trained on another header: by position
            return _headerless(path, header, names, by_name, 0)
        notes.append(f"{path}: no header (its first line is data); columns named x0..x{len(header) - 1}, as training names them")
    elif numbers_columns(header) and set(header) != set(names):
        return _headerless(path, header, names, by_name, skip)
    if len(set(header)) != len(header):
        twice = next(name for name in header if header.count(name) > 1)
        raise DataError(f"{path}: column {cut(twice)!r} appears more than once in the header")
    label = header.index(label_column) if label_column in header and label_column not in names else None
    if label is not None and not conditional:
        notes.append(f"{path}: column {label_column!r} skipped: the model takes no labels")
    if by_name:
        columns = _matched(path, header, names, None if label is None else label_column, conditional)
    else:
        columns = [i for i in range(len(header)) if i != label]
        if len(columns) != len(names):
            raise DataError(f"{path}: {len(columns)} columns; the model takes {len(names)}: {listed(names, NAMES)}")
    labels = None if label is None else _labels(path, skip, header, label)
    return Rows(_numbers(path, skip, header, columns, every_column=label is None), labels if conditional else None, notes)


def _first_lines(path: Path) -> tuple[list[str], list[str] | None, int]:
    """The first two non-empty lines' fields, stripped, and the count of lines up to the first."""
    try:
        with open(path, newline="") as f:
            reader = csv.reader(f)
            first = next((line for line in reader if line), None)
            read = reader.line_num
            second = next((line for line in reader if line), None)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path}: cannot read it as CSV ({err})") from None
    if first is None:
        raise DataError(f"{path}: empty file")
    return [cell.strip() for cell in first], None if second is None else [cell.strip() for cell in second], read


def _headerless(path: Path, first: list[str], names: list[str], by_name: bool, skip: int) -> Rows:
    """A CSV without names: its first line is a row, or (`skip`) only numbers its columns, as pandas writes
    unnamed ones."""
    what = "its first line only numbers the columns" if skip else "no header (its first line is data)"
    if len(first) != len(names):
        raise DataError(f"{path}: {what} and {len(first)} columns; the model takes {len(names)}: {listed(names, NAMES)}. "
                        f"Add a header line naming the columns")  # fmt: skip
    notes = [f"{path}: {what}; its {len(first)} columns taken in the model's order: {listed(names, NAMES)}"] if by_name else []
    header = [f"#{i + 1}" for i in range(len(first))]
    return Rows(_numbers(path, skip, header, list(range(len(first))), every_column=True), None, notes)


def _matched(path: Path, header: list[str], names: list[str], label_column: str | None, conditional: bool) -> list[int]:
    """The header's index of each of the model's features; one DataError for every column that does not match."""
    known, present = set(names), set(header)
    missing = [name for name in names if name not in present]
    unknown = [name for name in header if name not in known and name != label_column]
    if missing or unknown:
        problems = [f"{_count(len(missing), 'missing column')} {listed(missing, NAMES)}"] if missing else []
        problems += [f"{_count(len(unknown), 'unknown column')} {listed(unknown, NAMES)}"] if unknown else []
        labels = ", and its labels in a column named by --label-column (default 'label')" if conditional else ""
        raise DataError(f"{path}: {'; '.join(problems)}. The model takes {len(names)} columns, by name: "
                        f"{listed(names, NAMES)}{labels}")  # fmt: skip
    position = {name: i for i, name in enumerate(header)}
    return [position[name] for name in names]


def _count(n: int, what: str) -> str:
    return what if n == 1 else f"{n} {what}s:"


def _body(path: Path, skip: int):
    """(line number, fields) of each non-empty line after the first `skip`."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        for line in reader:
            if reader.line_num > skip and line:
                yield reader.line_num, line


def _labels(path: Path, skip: int, header: list[str], label: int) -> list[str]:
    """The label column's cells; every line must have the header's fields."""
    labels = []
    for number, line in _body(path, skip):
        if len(line) != len(header):
            raise DataError(f"{path}: line {number} has {len(line)} fields; the header has {len(header)}")
        labels.append(line[label].strip())
    return labels


def _numbers(path: Path, skip: int, header: list[str], columns: list[int], every_column: bool) -> np.ndarray:
    """The chosen columns of the body as float32 [rows, len(columns)], in that order. NumPy's parser reads
    them (fast); when it fails, the body is read again to name the line and column at fault."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data": said below
            x = np.loadtxt(path, np.float32, delimiter=",", skiprows=skip, ndmin=2, comments=None, quotechar='"',
                           usecols=None if every_column else columns)  # fmt: skip
    except ValueError as err:
        raise _fault(path, skip, header, columns) or DataError(f"{path}: not a numeric CSV ({err})") from None
    if not len(x):
        raise DataError(f"{path}: no rows under the header")
    return np.ascontiguousarray(x[:, columns] if every_column else x)


def _fault(path: Path, skip: int, header: list[str], columns: list[int]) -> DataError | None:
    """The first line with the wrong number of fields, or cell of `columns` that is not a number."""
    above = "the header" if skip else "the first line"
    for number, line in _body(path, skip):
        if len(line) != len(header):
            return DataError(f"{path}: line {number} has {len(line)} fields; {above} has {len(header)}")
        for column in columns:
            if not is_number(line[column]):
                return DataError(f"{path}: line {number}, column {cut(header[column])!r}: "
                                 f"{cut(line[column])!r} is not a number")  # fmt: skip
    return None
