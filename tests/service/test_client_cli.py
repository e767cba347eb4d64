"""`vaeserve client` against a real server: CSV columns matched by name, labels from a column, headerless
files, 20,000 rows in one command into .csv and .jsonl, readable tables and JSON, a closed pipe, --help,
and docs/api.md's CLI examples."""

import csv
import io
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vaeserve.cli import build_parser, main

DOCS = Path(__file__).resolve().parents[2] / "docs" / "api.md"
COMMANDS = ["embed", "reconstruct", "score", "generate", "decode", "models"]


@pytest.fixture(scope="module")
def names(client):
    return list(client.get_model("vae").feature_names)


@pytest.fixture
def cli(server, capsys, monkeypatch):
    """cli(RPC, *flags) -> (exit status, stdout, stderr), in-process against the session server."""
    monkeypatch.setenv("COLUMNS", "500")  # the table's width, whatever the terminal running the tests

    def run(command, *flags):
        capsys.readouterr()
        code = main(["client", command, "--host", "127.0.0.1", "--port", str(server.port), *map(str, flags)])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def write_csv(path: Path, x, header, labels=None, label_column="label", at=0) -> Path:
    """A CSV of rows x under `header`; with labels, a label column inserted at position `at`."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        columns = list(header)
        if labels is not None:
            columns.insert(at, label_column)
        writer.writerow(columns)
        for i, row in enumerate(np.asarray(x).tolist()):
            cells = [repr(v) for v in row]
            if labels is not None:
                cells.insert(at, labels[i])
            writer.writerow(cells)
    return path


def save_rows(path: Path, x, names) -> None:
    np.savetxt(path, x, delimiter=",", header=",".join(names), comments="", fmt="%.9g")


def scores(out: str) -> np.ndarray:
    return np.array([r["neg_elbo"] for r in json.loads(out)["rows"]])


def test_columns_are_matched_by_name_in_any_order(cli, client, rows, names, tmp_path):
    x = rows[0][:16]
    ordered = write_csv(tmp_path / "ordered.csv", x, names)
    order = np.random.default_rng(0).permutation(64)
    shuffled = write_csv(tmp_path / "shuffled.csv", x[:, order], [names[j] for j in order])
    code, out, err = cli("score", "--model", "vae", ordered, "--json")
    assert code == 0 and err == ""
    expected = client.score("vae", x).neg_elbo
    np.testing.assert_allclose(scores(out), expected, rtol=1e-12)
    code, out, _ = cli("score", "--model", "vae", shuffled, "--json")
    np.testing.assert_allclose(scores(out), expected, rtol=1e-12)
    # The same values by position (no names: an NPY file) score very differently.
    np.save(tmp_path / "shuffled.npy", x[:, order])
    _, out, _ = cli("score", "--model", "vae", tmp_path / "shuffled.npy", "--json")
    assert np.abs(scores(out) - expected).max() > 1.0


def test_a_missing_or_unknown_column_is_one_error_naming_it(cli, rows, names, tmp_path):
    header = [n if n != "pixel_0_3" else "pixel_03" for n in names]
    code, out, err = cli("score", "--model", "vae", write_csv(tmp_path / "typo.csv", rows[0][:4], header))
    assert code == 2 and out == ""
    assert err.startswith("vaeserve client: error: ") and err.count("\n") == 1
    assert "missing column ['pixel_0_3']; unknown column ['pixel_03']. The model takes 64 columns, by name: ['pixel_0_0', " in err
    assert "(64 in all)" in err  # the list is shortened
    code, _, err = cli("score", "--model", "vae", write_csv(tmp_path / "short.csv", rows[0][:4, 2:], names[2:]))
    assert code == 2 and "2 missing columns: ['pixel_0_0', 'pixel_0_1']." in err


def test_a_headerless_csv_is_taken_by_position_when_its_width_matches(cli, client, rows, tmp_path):
    x = rows[0][:8]
    np.savetxt(tmp_path / "bare.csv", x, delimiter=",", fmt="%.9g")
    code, out, err = cli("score", "--model", "vae", tmp_path / "bare.csv", "--json")
    assert code == 0 and "bare.csv: no header (its first line is data); its 64 columns taken in the model's order" in err
    np.testing.assert_allclose(scores(out), client.score("vae", x).neg_elbo, rtol=1e-12)
    np.savetxt(tmp_path / "narrow.csv", x[:, :63], delimiter=",", fmt="%.9g")
    code, out, err = cli("score", "--model", "vae", tmp_path / "narrow.csv")
    assert code == 2 and out == ""
    assert "narrow.csv: no header (its first line is data) and 63 columns; the model takes 64: ['pixel_0_0'" in err


def test_a_cvae_takes_its_labels_from_the_label_column(cli, client, rows, names, tmp_path):
    x, labels = rows[0][:12], rows[1][:12]
    expected = client.score("cvae", x, labels).neg_elbo
    in_column = write_csv(tmp_path / "labelled.csv", x, names, labels, at=5)
    code, out, err = cli("score", "--model", "cvae", in_column, "--json")
    assert code == 0 and err == ""
    np.testing.assert_allclose(scores(out), expected, rtol=1e-12)
    named = write_csv(tmp_path / "digit.csv", x, names, labels, label_column="digit", at=64)
    _, out, _ = cli("score", "--model", "cvae", named, "--label-column", "digit", "--json")
    np.testing.assert_allclose(scores(out), expected, rtol=1e-12)
    code, out, _ = cli("embed", "--model", "cvae", in_column, "--json")
    np.testing.assert_allclose([r["mu"] for r in json.loads(out)["rows"]], client.embed("cvae", x, labels).mu, rtol=1e-6)
    # An unconditional model skips the label column.
    code, out, err = cli("score", "--model", "vae", in_column, "--json")
    assert code == 0 and "column 'label' skipped: the model takes no labels" in err
    np.testing.assert_allclose(scores(out), client.score("vae", x).neg_elbo, rtol=1e-12)
    # No labels at all: Score goes label-free, the others refuse; a label column and --labels: refused.
    plain = write_csv(tmp_path / "plain.csv", x, names)
    code, out, err = cli("score", "--model", "cvae", plain, "--json")
    assert code == 0 and "no label column 'label'" in err and "scored label-free" in err
    np.testing.assert_allclose(scores(out), client.score("cvae", x).neg_elbo, rtol=1e-12)
    code, _, err = cli("reconstruct", "--model", "cvae", plain)
    assert code == 2 and "model cvae is conditional: it needs each row's label" in err
    code, _, err = cli("score", "--model", "cvae", in_column, "--labels", "3")
    assert code == 2 and "has a label column 'label', and --labels was given" in err
    _, out, _ = cli("score", "--model", "cvae", plain, "--labels", "3", "--json")
    np.testing.assert_allclose(scores(out), client.score("cvae", x, "3").neg_elbo, rtol=1e-12)


def test_twenty_thousand_rows_in_one_command_into_csv_and_jsonl(cli, client, digits, names, tmp_path):
    data, _, _, *_ = digits
    x = (np.resize(data.x, (20_000, 64)) + (np.arange(20_000) % 7)[:, None] * 0.25).astype(np.float32)
    save_rows(tmp_path / "big.csv", x, names)
    expected = client.score("vae", x, per_feature=True, iw_samples=4)  # split by the Python client too (max_rows 1000)
    top = np.argsort(-expected.per_feature, axis=1, kind="stable")[:, :3]

    code, _, err = cli("score", "--model", "vae", tmp_path / "big.csv", "--iw-samples", 4, "--out", tmp_path / "s.csv")
    assert code == 0 and f"wrote 20,000 rows to {tmp_path / 's.csv'}, {int(expected.is_anomaly.sum()):,} anomalous" in err
    with open(tmp_path / "s.csv", newline="") as f:
        lines = list(csv.reader(f))
    assert len(lines) == 20_001
    assert lines[0] == ["row", "anomaly_score", "p_value", "neg_elbo", "reconstruction", "kl", "knn_distance", "neg_iw",
                        "is_anomaly", "out_of_support",
                        "top1_feature", "top1_score", "top2_feature", "top2_score", "top3_feature", "top3_score"]  # fmt: skip
    table = np.array(lines[1:], dtype=object)
    assert [int(r) for r in table[:, 0]] == list(range(20_000))
    for column, field in enumerate(("anomaly_score", "p_value", "neg_elbo", "reconstruction", "kl", "knn_distance", "neg_iw"), 1):
        np.testing.assert_allclose(table[:, column].astype(float), getattr(expected, field), rtol=1e-12, err_msg=field)
    np.testing.assert_array_equal(table[:, 8] == "true", expected.is_anomaly)
    np.testing.assert_array_equal(table[:, 9] == "true", expected.out_of_support)
    assert expected.out_of_support.any() and not expected.out_of_support.all()
    np.testing.assert_array_equal(table[:, 10], np.array(names)[top[:, 0]])
    best = np.take_along_axis(expected.per_feature, top[:, :1], axis=1)[:, 0]
    np.testing.assert_allclose(table[:, 11].astype(float), best, rtol=1e-6)

    code, _, _ = cli("score", "--model", "vae", tmp_path / "big.csv", "--out", tmp_path / "s.jsonl")
    records = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert code == 0 and len(records) == 20_000 and [r["row"] for r in records] == list(range(20_000))
    plain = client.score("vae", x)
    np.testing.assert_allclose([r["neg_elbo"] for r in records], plain.neg_elbo, rtol=1e-12)
    assert [f["feature"] for f in records[7]["top_features"]] == [names[j] for j in top[7]]
    np.testing.assert_allclose([r["p_value"] for r in records], plain.p_value, rtol=1e-12)
    assert "neg_iw" not in records[0] and set(records[0]) == {"row", "anomaly_score", "p_value", "neg_elbo", "reconstruction",
                                                               "kl", "knn_distance", "is_anomaly", "out_of_support",
                                                               "top_features"}  # fmt: skip


def test_a_closed_pipe_ends_the_command_quietly(server, digits, names, tmp_path):
    data, _, _, *_ = digits
    save_rows(tmp_path / "rows.csv", np.resize(data.x, (3000, 64)), names)
    command = [sys.executable, "-m", "vaeserve.cli", "client", "score", "--host", "127.0.0.1", "--port", str(server.port),
               "--model", "vae", str(tmp_path / "rows.csv")]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # a table of ~200 KB
    first = process.stdout.readline()  # then stop reading, as `| head -1` does
    process.stdout.close()
    err = process.stderr.read().decode()
    assert process.wait(60) == 0, err
    assert first.startswith(b"vae version 1: threshold ") and err == ""


def test_tables_are_aligned_with_names_and_fixed_precision(cli, rows, names, tmp_path):
    x = rows[0][:5]
    path = write_csv(tmp_path / "rows.csv", x, names)
    code, out, err = cli("score", "--model", "vae", path, "--per-feature", "--iw-samples", 8)
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("vae version 1: threshold ") and "rows anomalous" in lines[0]
    header = lines[1].split("  ")
    assert [h.strip() for h in header if h.strip()] == ["row", "anomaly_score", "p_value", "neg_elbo", "reconstruction", "kl",
                                                        "knn_distance", "neg_iw", "is_anomaly", "out_of_support",
                                                        "top features"]  # fmt: skip
    assert len({len(line) for line in lines[2:]}) == 1  # aligned
    number, flag, top = r"\s+-?\d+\.\d{4}(e[-+]\d+)?", r"\s+(yes|no)", r"pixel_\d_\d \d+\.\d{4}"  # a combined score may be negative; knn of a training row ~1e-6
    for line in lines[2:]:
        assert re.fullmatch(rf"\s+\d+{number * 7}{flag * 2}\s+{top}, {top}, {top}", line), line
    # 64 features by name, cut at 12 columns, the rest counted.
    code, out, err = cli("reconstruct", "--model", "vae", path)
    assert out.splitlines()[0].split() == ["row", "neg_log_likelihood", "mean_squared_error", *names[:9]]
    assert err == "... 55 more columns; --json for all\n"
    code, out, _ = cli("reconstruct", "--model", "vae", path, "--json")
    assert list(json.loads(out)["rows"][0]["x"]) == names
    # Posterior samples: a table of their own; in JSON, per row.
    code, out, _ = cli("embed", "--model", "vae", path, "--samples", 2, "--seed", 3)
    below = out.split("\n\nposterior samples, 2 per row\n")[1].splitlines()
    assert below[0].split() == ["row", "sample", "z[0]", "z[1]", "z[2]", "z[3]"] and len(below) == 1 + 2 * len(x)
    code, out, _ = cli("embed", "--model", "vae", path, "--samples", 2, "--seed", 3, "--json")
    assert np.asarray(json.loads(out)["rows"][4]["samples"]).shape == (2, 4)
    # --json --per-feature: every feature's score by name.
    code, out, _ = cli("score", "--model", "vae", path, "--per-feature", "--json")
    record = json.loads(out)["rows"][0]
    assert list(record["per_feature"]) == names and len(record["top_features"]) == 3
    assert record["top_features"][0]["score"] == max(record["per_feature"].values())


def test_alpha_flags_at_a_false_positive_rate(cli, client, rows, names, tmp_path):
    x = np.vstack([rows[0], rows[0][:8] * 0.5 + 4.0])
    path = write_csv(tmp_path / "rows.csv", x, names)
    expected = client.score("vae", x, alpha=0.25)
    code, out, err = cli("score", "--model", "vae", path, "--alpha", 0.25, "--json")
    answer = json.loads(out)
    assert code == 0 and err == "" and (answer["alpha"], answer["threshold"]) == (0.25, expected.threshold)
    flags = [r["is_anomaly"] for r in answer["rows"]]
    assert flags == [r["p_value"] <= 0.25 for r in answer["rows"]] == expected.is_anomaly.tolist() and 0 < sum(flags) < len(x)
    code, out, _ = cli("score", "--model", "vae", path, "--alpha", 0.25)
    assert code == 0 and out.splitlines()[0] == (f"vae version 1: alpha 0.25, threshold {expected.threshold:.4f} on combined; "
                                                 f"{sum(flags)} of {len(x)} rows anomalous")  # fmt: skip
    # Out of reach of the calibration rows: the server's refusal, as it words it.
    code, out, err = cli("score", "--model", "vae", path, "--alpha", 1e-4)
    assert code == 1 and out == "" and err.startswith("vaeserve client: INVALID_ARGUMENT: alpha 0.0001 is out of reach: ")
    with pytest.raises(SystemExit) as caught:  # one or the other: argparse says so before any call
        cli("score", "--model", "vae", path, "--alpha", 0.25, "--threshold", 1.0)
    assert caught.value.code == 2


def test_models_summary_and_json(cli, client, model_repository):
    from vaeserve.artifact.manifest import read_manifest

    manifest = read_manifest(model_repository / "cvae" / "1")
    code, out, _ = cli("models")
    assert code == 0 and [line.split() for line in out.splitlines()] == [["model", "versions"], ["cvae", "1"], ["ppca", "1"],
                                                                         ["vae", "1"]]  # fmt: skip
    code, out, _ = cli("models", "--model", "cvae")
    topics = {line[:10].strip(): line[11:] for line in out.splitlines() if line[:10].strip()}
    assert topics["model"] == "cvae, version 1"
    assert topics["features"].startswith("64, images 1x8x8: pixel_0_0, pixel_0_1,") and topics["features"].endswith("(64 in all)")
    assert topics["labels"] == "10: 0, 1, 2, 3, 4, 5, ..., 8, 9 (10 in all)"
    t = manifest.thresholds
    n = t.calibration_rows
    assert topics["threshold"] == (f"{t.default:.4f} on combined: calibrated over {n} {t.calibrated_on}, "
                                   f"scored label-free")  # fmt: skip
    assert topics["fp rate"] == (f"target 0.01, the default threshold holds {t.promised_false_positive_rate:.4g}; "
                                 f"smallest --alpha {1 / (n + 1):.4g} (1/(n+1), n = {n})")  # fmt: skip
    assert topics["limits"].startswith("1,000 rows and 33,554,432 values of work per request, iw_samples up to 256")
    assert topics["providers"].startswith("encoder CPUExecutionProvider; decoder ")
    code, out, _ = cli("models", "--model", "cvae", "--json")
    info = json.loads(out)
    assert (info["version"], info["opset"], info["latent_dim"]) == (1, manifest.opset, 4)  # numbers, not strings
    assert info["limits"] == {"max_rows": 1000, "max_request_values": 2**25, "max_iw_samples": 256, "max_posterior_samples": 256}
    assert list(info["quantiles"]["neg_elbo"]) == ["0.95", "0.99", "0.999"] and "manifest_json" not in info
    assert info["threshold"]["calibration_rows"] == manifest.thresholds.calibration_rows
    assert (info["threshold"]["score"], info["threshold"]["smallest_false_positive_rate"]) == ("combined", 1 / (n + 1))
    assert info["threshold"]["promised_false_positive_rate"] == t.promised_false_positive_rate and info["threshold"]["target_reached"]
    # A target the calibration rows cannot reach (promised above it) is said plainly.
    import dataclasses

    from vaeserve.service.output import model_summary

    described = client.get_model("cvae")
    unreachable = dataclasses.replace(described.calibration, target_false_positive_rate=t.promised_false_positive_rate / 2)
    [line] = [line for line in model_summary(dataclasses.replace(described, calibration=unreachable)) if line.startswith("fp rate")]
    assert f"out of reach of {n} calibration rows: the default threshold holds {t.promised_false_positive_rate:.4g}, above it" in line
    assert info["scoring"]["seed"] == manifest.scoring.seed and info["graphs"]["score"]["providers"]


def test_every_client_command_has_a_description_an_example_and_help_on_every_flag(capsys):
    parser = build_parser()
    client = parser._subparsers._group_actions[0].choices["client"]
    commands = client._subparsers._group_actions[0]
    assert list(commands.choices) == COMMANDS
    assert client.epilog.startswith("examples:\n  vaeserve client ")
    for name, sub in commands.choices.items():
        assert sub.description and sub.epilog.startswith("example") and f"vaeserve client {name}" in sub.epilog, name
        assert all(action.help for action in sub._actions), [a.dest for a in sub._actions if not a.help]
        assert [c for c in commands._choices_actions if c.dest == name][0].help, name  # its line in `client --help`
        with pytest.raises(SystemExit):
            main(["client", name, "--help"])
        assert f"\n  vaeserve client {name} " in capsys.readouterr().out


def test_the_docs_cli_examples_run(cli, rows, names, tmp_path):
    """Each command of docs/api.md's CLI block, as written, against the test server's `vae` for `digits`."""
    x = rows[0][:8]
    sample_rows = write_csv(tmp_path / "sample_rows.csv", x, names)
    text = DOCS.read_text()
    section = text[text.index("## Clients"):text.index("\n## ", text.index("## Clients"))]
    block = re.search(r"### CLI\n```bash\n(.*?)```", section, re.S).group(1)
    commands = [shlex.split(line) for line in block.splitlines() if line.strip()]
    assert len(commands) >= 5 and all(c[:2] == ["vaeserve", "client"] for c in commands)
    for words in commands:
        words = [{"digits": "vae", "runs/digits/sample_rows.csv": str(sample_rows),
                  "scores.csv": str(tmp_path / "scores.csv")}.get(w, w) for w in words[2:]]  # fmt: skip
        code, out, err = cli(*words)
        assert code == 0, (words, err)
        assert out or "--out" in words, words
    assert len((tmp_path / "scores.csv").read_text().splitlines()) == 1 + len(x)



def test_a_long_run_shows_its_progress_on_a_terminal(server, digits, names, tmp_path, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    data, _, _, *_ = digits
    path = tmp_path / "rows.csv"
    save_rows(path, np.resize(data.x, (2500, 64)), names)
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    code = main(["client", "score", "--host", "127.0.0.1", "--port", str(server.port), "--model", "vae", str(path),
                 "--out", str(tmp_path / "s.csv")])  # fmt: skip
    shown = terminal.getvalue()
    assert code == 0 and shown.startswith("\rvaeserve client score: 1,000/2,500 rows (40%)")
    assert "\r\x1b[Kvaeserve client: wrote 2,500 rows" in shown  # the line cleared before the summary


def test_a_cvae_trained_on_a_label_column_is_scored_by_that_column_name(digits, tmp_path, start_server, capsys):
    """`train --labels kind` records the column in the manifest; the client then reads a CSV's labels from
    `kind` without being told, and scores them as the labels they are."""
    from vaeserve.service.client import Client

    data, _, _, *_ = digits
    path = tmp_path / "rows.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["kind", *data.feature_names])
        for x, y in zip(data.x[:400], data.y[:400]):
            writer.writerow([data.label_names[y], *x])
    assert main(["train", "--data", str(path), "--labels", "kind", "--model", "cvae", "--epochs", "3", "--no-plots",
                 "--eval-samples", "0", "--out", str(tmp_path / "run")]) == 0  # fmt: skip
    assert main(["export", str(tmp_path / "run"), "--repository", str(tmp_path / "models"), "--name", "kinds", "--no-plots"]) == 0
    manifest = json.loads((tmp_path / "models" / "kinds" / "1" / "manifest.json").read_text())
    assert manifest["labels"]["column"] == "kind"
    server = start_server(tmp_path / "models")
    try:
        server.wait_serving()
        capsys.readouterr()
        assert main(["client", "score", "--host", "127.0.0.1", "--port", str(server.port), "--model", "kinds", str(path),
                     "--json"]) == 0  # fmt: skip
        scored = json.loads(capsys.readouterr().out)
        with Client(server.target) as client:
            assert client.get_model("kinds").label_column == "kind"
            expected = client.score("kinds", data.x[:400], [data.label_names[y] for y in data.y[:400]])
    finally:
        server.stop()
    np.testing.assert_allclose([r["neg_elbo"] for r in scored["rows"]], expected.neg_elbo, rtol=1e-6)
