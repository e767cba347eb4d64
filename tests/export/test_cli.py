"""`vaeserve export` from the command line."""

import re
import shutil

import numpy as np
from matplotlib.image import imread

from vaeserve.artifact.repository import load_version, scan_repository
from vaeserve.artifact.runtime import Model
from vaeserve.cli import main
from vaeserve.training.checkpoint import load_checkpoint


def test_export_command_writes_a_version(make_checkpoint, tmp_path, capsys):
    checkpoint = shutil.copytree(make_checkpoint("ppca", kind="ppca", latent_dim=8), tmp_path / "runs" / "ppca")
    repository = tmp_path / "models"
    assert main(["export", str(checkpoint), "--repository", str(repository), "--name", "digits"]) == 0
    assert main(["export", str(checkpoint), "--repository", str(repository), "--no-plots"]) == 0  # name from the folder
    out = capsys.readouterr().out
    assert f"exported {repository / 'digits' / '1'}" in out
    models = scan_repository(repository)
    assert sorted(models) == ["digits", "ppca"] and list(models["digits"]) == [1]
    # the thresholds plot goes beside the training plots, named by version; --no-plots writes none
    plot = checkpoint / "plots" / "thresholds_digits_v1.png"
    assert f"thresholds plot: {plot}" in out
    assert sorted(p.name for p in (checkpoint / "plots").iterdir()) == ["thresholds_digits_v1.png"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = imread(plot)
    assert pixels.shape[0] > 300 and pixels.shape[1] > 600 and pixels[..., :3].std() > 0.05


def test_target_rate_and_neighbours_from_the_command_line(make_checkpoint, tmp_path, capsys, caplog):
    """--target-fpr sets the rate the default threshold holds (out of reach: a warning and the smallest rate
    the 180 calibration rows support); --neighbours 0 exports -ELBO alone, without the neighbour graph."""
    checkpoint = make_checkpoint("ppca", kind="ppca", latent_dim=8)
    repository = tmp_path / "models"
    assert main(["export", str(checkpoint), "--repository", str(repository), "--name", "m", "--no-plots",
                 "--target-fpr", "0.05"]) == 0  # fmt: skip
    t = load_version(repository / "m" / "1").manifest.thresholds
    assert t.target_false_positive_rate == 0.05 and t.promised_false_positive_rate == 9 / 181  # k = floor(0.05 * 181)
    assert t.default == t.calibration_scores[-9]
    assert "flagging 4.97% of normal rows like its 180 calibration rows" in capsys.readouterr().out
    assert main(["export", str(checkpoint), "--repository", str(repository), "--name", "m", "--no-plots",
                 "--target-fpr", "0.001", "--neighbours", "0"]) == 0  # fmt: skip
    m = load_version(repository / "m" / "2").manifest
    assert "the false-positive target 0.001 is out of reach of 180 calibration rows (it needs 999)" in caplog.text
    assert m.thresholds.promised_false_positive_rate == 1 / 181 and m.thresholds.default == m.thresholds.calibration_scores[-1]
    assert m.thresholds.score == "neg_elbo" and m.neighbours is None and m.scoring.combination is None
    assert not (repository / "m" / "2" / "neighbours.onnx").exists()
    assert main(["export", str(checkpoint), "--repository", str(repository), "--name", "m", "--target-fpr", "1.5"]) == 2
    assert "--target-fpr must be in (0, 1), got 1.5" in capsys.readouterr().err


def test_thresholds_plot_draws_the_versions_thresholds(make_checkpoint, tmp_path):
    """A CVAE: its calibration rows scored label-free, as calibrated; the conformal default threshold and a
    line at every calibrated quantile."""
    from vaeserve.conformal import Calibration
    from vaeserve.export.exporter import export_checkpoint
    from vaeserve.training import plots

    checkpoint = load_checkpoint(shutil.copytree(make_checkpoint("cvae", kind="cvae"), tmp_path / "cvae"))
    version = export_checkpoint(checkpoint, tmp_path / "models", "cvae")
    thresholds = version.manifest.thresholds
    x_raw, _ = checkpoint.calibration_rows()
    scores = Model(load_version(version.path)).scorer.score(x_raw).anomaly_score
    # calibration scored these rows label-free: the default is their conformal threshold, the k-th largest
    calibration = Calibration.of(scores)
    k = int(0.01 * (len(scores) + 1))
    assert thresholds.label_free and thresholds.score == "combined" and k >= 1
    assert np.isclose(np.sort(scores)[-k], thresholds.default, rtol=1e-6)
    assert np.isclose(calibration.threshold(0.01), thresholds.default, rtol=1e-6)
    np.testing.assert_allclose(thresholds.calibration_scores, np.sort(scores), rtol=1e-6)
    assert thresholds.promised_false_positive_rate == k / (len(scores) + 1) <= 0.01
    fig = plots._thresholds(scores, version.manifest)
    ax = fig.axes[0]
    lines = {float(line.get_xdata()[0]): line.get_label() for line in ax.get_lines() if line.get_xdata()}
    quantiles = thresholds.quantiles["combined"]
    assert sorted(lines) == sorted([*quantiles.values(), thresholds.default])
    assert lines[thresholds.default].startswith(f"default threshold {thresholds.default:.2f}: holds a false-positive rate of ")
    assert sum(p.get_height() for p in ax.patches) == len(scores)  # every row in the histogram
    assert ax.get_xlabel().startswith("combined anomaly score") and ax.get_ylabel() == "calibration rows"
    path = plots.plot_thresholds(checkpoint, version)
    assert path == checkpoint.path / "plots" / "thresholds_cvae_v1.png" and path.read_bytes()[:4] == b"\x89PNG"


def test_export_command_reports_failure_in_one_line(make_checkpoint, tmp_path, capsys):
    checkpoint = make_checkpoint("ppca", kind="ppca", latent_dim=8)
    assert main(["export", str(checkpoint), "--repository", str(tmp_path), "--name", "m", "--tolerance", "0"]) == 2
    err = capsys.readouterr().err
    # Which outputs differ at tolerance 0 depends on the float rounding of this CPU's kernels: any may match exactly.
    listed = r"(encoder|decoder)\.\w+ max abs diff [0-9.e+-]+"
    assert re.fullmatch(rf"vaeserve export: error: ONNX Runtime disagrees with torch beyond tolerance 0: {listed}(, {listed})*\n",
                        err), err  # fmt: skip
    assert list((tmp_path / "m").iterdir()) == []
    assert main(["export", str(tmp_path / "missing"), "--repository", str(tmp_path), "--name", "m"]) == 2
    assert "is not a checkpoint: weights.pt is missing" in capsys.readouterr().err


def test_export_help_describes_every_flag_and_gives_an_example():
    from vaeserve.cli import build_parser

    parser = build_parser()
    export = next(a for a in parser._actions if a.dest == "command").choices["export"]
    assert "vaeserve export runs/digits" in export.epilog and "thresholds_NAME_vVERSION.png" in export.description
    assert [a.option_strings or a.dest for a in export._actions if not a.help] == []
