"""CSV headers: a file without one is read as rows (x0..x{n-1}); a header of names or of column numbers
is a header; an NPZ label array named with --labels must be there."""

import numpy as np
import pytest

from vaeserve.errors import DataError
from vaeserve.training.data import load_dataset


def write_lines(path, rows) -> str:
    path.write_text("".join(",".join(str(v) for v in row) + "\n" for row in rows))
    return str(path)


def test_csv_without_header_uses_every_line(tmp_path, table):
    data = load_dataset(write_lines(tmp_path / "rows.csv", table))
    assert data.x.shape == (60, 3)  # all 60 lines are rows: none was taken for a header
    assert data.feature_names == ["x0", "x1", "x2"]
    np.testing.assert_allclose(data.x, table, rtol=1e-6)
    assert data.notes == ("rows.csv has no header (its first line is data): every line is a row, "
                          "columns named x0..x2",)  # fmt: skip


def test_csv_without_header_with_a_text_label_column(tmp_path, table):
    rows = [[*r, "odd" if i % 2 else "even"] for i, r in enumerate(table)]
    data = load_dataset(write_lines(tmp_path / "labelled.csv", rows), labels="x3")
    assert data.x.shape == (60, 3) and data.feature_names == ["x0", "x1", "x2"]
    assert data.label_names == ["even", "odd"] and data.y.tolist() == [i % 2 for i in range(60)]


@pytest.mark.parametrize("header", [["a", "b", "c"], ["0", "1", "2"], ["1", "2", "3"]])
def test_csv_header_of_names_or_column_numbers(tmp_path, table, header, write_csv):
    data = load_dataset(str(write_csv("rows.csv", header, table)))
    assert data.x.shape == (60, 3) and data.feature_names == header and data.notes == ()
    np.testing.assert_allclose(data.x, table, rtol=1e-6)


def test_missing_label_column_names_it_and_lists_the_columns(tmp_path, table, write_csv):
    path = write_csv("rows.csv", ["a", "b", "c"], table)
    with pytest.raises(DataError) as err:
        load_dataset(str(path), labels="kind")
    assert str(err.value) == f"{path}: no label column 'kind' for --labels; its 3 columns are ['a', 'b', 'c']"
    headerless = write_lines(tmp_path / "bare.csv", table)
    with pytest.raises(DataError, match=r"no label column 'kind' for --labels; the file has no header \(its first "
                       r"line is data\), so its 3 columns are named \['x0', 'x1', 'x2'\]$"):  # fmt: skip
        load_dataset(headerless, labels="kind")


def test_missing_label_column_of_a_wide_file_lists_the_first_columns(tmp_path, write_csv):
    path = write_csv("wide.csv", [f"pixel{i}" for i in range(784)], np.zeros((20, 784), int))
    with pytest.raises(DataError) as err:
        load_dataset(str(path), labels="label")
    message = str(err.value)
    assert message.endswith("'pixel17', ..., 'pixel782', 'pixel783'] (784 in all)") and "its 784 columns" in message


def test_npz_label_array_named_with_labels_must_exist(tmp_path, table):
    path = tmp_path / "rows.npz"
    np.savez(path, X=table, y=np.arange(60) % 2)
    assert load_dataset(str(path)).label_names == ["0", "1"]  # 'y' by default
    with pytest.raises(DataError, match=r"rows.npz: no label array 'kind' for --labels \(holds X, y\)"):
        load_dataset(str(path), labels="kind")
