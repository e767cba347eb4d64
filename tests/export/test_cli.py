"""`vaeserve export` from the command line."""

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


def test_thresholds_plot_draws_the_versions_thresholds(make_checkpoint, tmp_path):
    """A CVAE: its held-out rows scored label-free, as calibrated; a line at every calibrated quantile."""
    from vaeserve.export.exporter import export_checkpoint
    from vaeserve.training import plots

    checkpoint = load_checkpoint(shutil.copytree(make_checkpoint("cvae", kind="cvae"), tmp_path / "cvae"))
    version = export_checkpoint(checkpoint, tmp_path / "models", "cvae")
    thresholds = version.manifest.thresholds
    x_raw, _ = checkpoint.validation_rows()
    scores = Model(load_version(version.path)).scorer.score(x_raw).neg_elbo
    # calibration scored these rows label-free: its 99% quantile is theirs
    assert thresholds.label_free and np.isclose(np.quantile(scores, 0.99), thresholds.default, rtol=1e-6)
    fig = plots._thresholds(scores, version.manifest)
    ax = fig.axes[0]
    lines = {float(line.get_xdata()[0]): line.get_label() for line in ax.get_lines() if line.get_xdata()}
    quantiles = thresholds.quantiles["neg_elbo"]
    assert sorted(lines) == sorted(quantiles.values())
    assert lines[thresholds.default].startswith(f"default threshold {thresholds.default:.2f} (quantile 0.99), 1.")
    assert sum(p.get_height() for p in ax.patches) == len(scores)  # every row in the histogram
    assert ax.get_xlabel() == "-ELBO (nats per row, normalised feature space)" and ax.get_ylabel() == "held-out rows"
    path = plots.plot_thresholds(checkpoint, version)
    assert path == checkpoint.path / "plots" / "thresholds_cvae_v1.png" and path.read_bytes()[:4] == b"\x89PNG"


def test_export_command_reports_failure_in_one_line(make_checkpoint, tmp_path, capsys):
    checkpoint = make_checkpoint("ppca", kind="ppca", latent_dim=8)
    assert main(["export", str(checkpoint), "--repository", str(tmp_path), "--name", "m", "--tolerance", "0"]) == 2
    err = capsys.readouterr().err
    assert "vaeserve export: error: ONNX Runtime disagrees with torch beyond tolerance 0: encoder.mu max abs diff" in err
    assert list((tmp_path / "m").iterdir()) == []
    assert main(["export", str(tmp_path / "missing"), "--repository", str(tmp_path), "--name", "m"]) == 2
    assert "is not a checkpoint: weights.pt is missing" in capsys.readouterr().err


def test_export_help_describes_every_flag_and_gives_an_example():
    from vaeserve.cli import build_parser

    parser = build_parser()
    export = next(a for a in parser._actions if a.dest == "command").choices["export"]
    assert "vaeserve export runs/digits" in export.epilog and "thresholds_NAME_vVERSION.png" in export.description
    assert [a.option_strings or a.dest for a in export._actions if not a.help] == []
