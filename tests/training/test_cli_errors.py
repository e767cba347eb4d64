"""Bad input through the real `vaeserve` entry point: exit code 2 and one line naming the problem."""

import numpy as np
import pytest

from vaeserve.cli import main


def run_train(capsys, *args) -> tuple[int, str]:
    code = main(["train", "--no-plots", "--epochs", "1", *args])
    err = capsys.readouterr().err.strip()
    return code, err


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    last = err.splitlines()[-1]
    assert last.startswith("vaeserve train: error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in last, last


def test_missing_file(capsys, tmp_path):
    code, err = run_train(capsys, "--data", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "data not found", "nope.csv")


def test_unknown_format(capsys, tmp_path):
    path = tmp_path / "data.parquet"
    path.write_bytes(b"PAR1")
    code, err = run_train(capsys, "--data", str(path), "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "unknown data format", "data.parquet")


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_nan_or_inf(capsys, tmp_path, write_csv, table, bad):
    rows = table.astype(object)
    rows[7, 1] = bad
    path = write_csv("bad.csv", ["a", "b", "c"], rows)
    code, err = run_train(capsys, "--data", str(path), "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "1 NaN/Inf values", "row 7", "'b'")


def test_non_numeric_column(capsys, tmp_path, write_csv, table):
    rows = [[*r, "red" if i % 2 else "blue"] for i, r in enumerate(table)]
    path = write_csv("colours.csv", ["a", "b", "c", "colour"], rows)
    code, err = run_train(capsys, "--data", str(path), "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "column 'colour' is not numeric", "'blue'", "--labels")


def test_too_few_rows(capsys, tmp_path, write_csv, table):
    path = write_csv("small.csv", ["a", "b", "c"], table[:10])
    code, err = run_train(capsys, "--data", str(path), "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "10 rows", "at least 20")


def test_cvae_label_column_with_one_class(capsys, tmp_path, write_csv, table):
    rows = [[*r, "normal"] for r in table]
    path = write_csv("one_class.csv", ["a", "b", "c", "kind"], rows)
    code, err = run_train(capsys, "--data", str(path), "--labels", "kind", "--model", "cvae", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "one class ('normal')", "a CVAE needs at least 2")


def test_cvae_without_labels(capsys, tmp_path, table):
    path = tmp_path / "rows.npy"
    np.save(path, table)
    code, err = run_train(capsys, "--data", str(path), "--model", "cvae", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "a CVAE needs labels", "--labels")


def test_bad_setting(capsys, tmp_path):
    code, err = run_train(capsys, "--lr", "-1", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "--lr must be positive")
    code, err = run_train(capsys, "--arch", "conv", "--data", "nope", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "data not found")
    assert not (tmp_path / "o").exists()  # nothing written for a run that never started


def test_missing_label_column(capsys, tmp_path, write_csv, table):
    path = write_csv("rows.csv", ["a", "b", "c"], table)
    code, err = run_train(capsys, "--data", str(path), "--labels", "kind", "--model", "cvae", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "no label column 'kind' for --labels", "its 3 columns are ['a', 'b', 'c']")
    assert not (tmp_path / "o").exists()
