"""End to end: a short training run writes a checkpoint, metrics and plots; `vaeserve evaluate`
adds its estimate; a CVAE on digits generates the digits it is asked for."""

import json
import math

import numpy as np
import torch
from matplotlib.image import imread

from vaeserve.cli import main
from vaeserve.scoring import decoder_mean
from vaeserve.training.checkpoint import load_checkpoint
from vaeserve.training.model import decode_params
from vaeserve.training.train import TrainConfig, default_hidden, default_latent_dim, train



TINY_EPOCHS = 4  # as in conftest.tiny_run
PLOTS = ["loss_curves.png", "reconstructions.png", "samples.png", "latent_map.png", "interpolation.png"]


def test_tiny_run_writes_checkpoint_metrics_and_plots(tiny_run):
    result, out = tiny_run
    for name in ["weights.pt", "config.json", "metrics.json", "validation.npz", "training_state.pt"]:
        assert (out / name).is_file(), name
    assert [p.name for p in result.plots] == PLOTS
    for path in result.plots:
        pixels = imread(path)
        assert pixels.shape[0] > 100 and pixels.shape[1] > 300, path
        assert pixels[..., :3].std() > 0.05, f"{path.name} is blank"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == result.metrics
    assert metrics["epochs_run"] == TINY_EPOCHS and len(metrics["history"]) == TINY_EPOCHS
    assert [h["beta"] for h in metrics["history"]] == [0.5, 1.0, 1.0, 1.0]  # warm-up over 2 epochs
    assert metrics["warmup_finished"] is True and metrics["still_improving"] == (metrics["best_epoch"] == TINY_EPOCHS)
    assert len(metrics["warnings"]) == int(metrics["still_improving"])
    val = metrics["validation"]
    assert val["rows"] == 359 and val["iw_samples"] == 20  # 20% of digits' 1797 rows held out
    assert math.isclose(val["neg_elbo"], val["reconstruction"] + val["kl"], rel_tol=1e-9)
    checkpoint = load_checkpoint(out)
    x_val = torch.from_numpy(checkpoint.data.normalization.apply(checkpoint.validation_rows()[0]))
    with torch.no_grad():
        mu, _ = checkpoint.model.encoder(x_val)
    assert metrics["active_units"] == int((mu.var(dim=0, unbiased=False) > 0.01).sum())
    # A 4-epoch model is poor but far better than chance: uniform Bernoulli costs 64 log 2 = 44.4 nats.
    assert 15 < val["neg_elbo"] < 44.4
    assert abs(val["iw_log_likelihood"] + val["neg_elbo"]) < 2.0
    assert metrics["seconds"] > 0
    # class prior: label frequencies of the training rows only
    from vaeserve.training.data import load_dataset, split

    data = load_dataset("digits")
    train_rows, val_rows, _ = split(data, 0.2, seed=0, calibration_fraction=0.2)
    counts = np.bincount(data.y[train_rows], minlength=10)
    np.testing.assert_allclose(load_checkpoint(out).data.class_prior, counts / counts.sum(), rtol=1e-12)
    np.testing.assert_array_equal(load_checkpoint(out).validation_rows()[0], data.x[val_rows])


def test_evaluate_command_writes_its_estimate(tiny_run, tmp_path, capsys):
    import shutil

    _, out = tiny_run
    copy = tmp_path / "ckpt"
    shutil.copytree(out, copy)
    assert main(["evaluate", str(copy), "--k", "50"]) == 0
    printed = capsys.readouterr().out
    evaluation = json.loads((copy / "metrics.json").read_text())["evaluation"]
    assert evaluation["iw_samples"] == 50 and evaluation["rows"] == 359
    assert f"{evaluation['iw_log_likelihood']:.3f}" in printed
    assert evaluation["iw_log_likelihood"] >= -evaluation["neg_elbo"] - 0.5


def test_defaults_follow_the_data():
    assert default_latent_dim(64) == 8 and default_latent_dim(784) == 28 and default_latent_dim(9) == 3
    assert default_hidden(64) == (128, 64) and default_hidden(784) == (512, 256) and default_hidden(9) == (64, 32)


def test_cvae_generates_the_class_asked_for(tmp_path):
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    out = tmp_path / "cvae"
    metrics = train(TrainConfig(model="cvae", epochs=60, plots=False, eval_samples=0), out).metrics
    assert "label_free" in metrics["validation"]
    checkpoint = load_checkpoint(out)
    digits = load_digits()
    classifier = LogisticRegression(max_iter=2000).fit(digits.data, digits.target)
    z = torch.randn(1000, checkpoint.model_config.latent_dim, generator=torch.Generator().manual_seed(1))
    y = torch.eye(10)[torch.arange(10).repeat_interleave(100)]
    with torch.no_grad():
        params = {k: v.numpy() for k, v in decode_params(checkpoint.model, z, y).items()}
    samples = checkpoint.data.normalization.invert(decoder_mean(params, checkpoint.model_config.likelihood))
    predicted = classifier.predict(samples).reshape(10, 100)
    per_class = (predicted == np.arange(10)[:, None]).mean(axis=1)
    assert per_class.min() >= 0.8, per_class


def test_gaussian_vae_beats_ppca_on_held_out_digits(tmp_path, ppca_run):
    """Same rows, same minmax normalisation, same latent size (8): the VAE's importance-weighted
    log-likelihood is above PPCA's exact one, row for row on average."""
    from vaeserve.training.evaluate import evaluate, exact_log_likelihood

    out = tmp_path / "vae-gaussian"
    train(TrainConfig(likelihood="gaussian", latent_dim=8, epochs=30, plots=False, eval_samples=0), out)
    vae, ppca = load_checkpoint(out), load_checkpoint(ppca_run)
    assert vae.data.normalization.to_dict() == ppca.data.normalization.to_dict()
    x_raw, _ = vae.validation_rows()
    np.testing.assert_array_equal(x_raw, ppca.validation_rows()[0])
    vae_ll = evaluate(vae.model, vae.data, x_raw, None, iw_samples=100)["iw_log_likelihood"]
    ppca_ll = exact_log_likelihood(ppca.model, ppca.data.normalization.apply(x_raw)).mean()
    assert vae_ll > ppca_ll + 5.0, (vae_ll, ppca_ll)


def test_train_help_states_the_config_defaults():
    """--help text repeats TrainConfig's defaults (the CLI module cannot import torch to read them)."""
    import re
    from dataclasses import fields

    from vaeserve.scoring import LIKELIHOODS
    from vaeserve.training.cli import CHOICES, TRAIN_FLAGS
    from vaeserve.training.model import ARCHS, KINDS

    assert CHOICES == {"model": KINDS, "arch": ARCHS, "likelihood": LIKELIHOODS}
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    checked = 0
    for flag, dest, kind, text in TRAIN_FLAGS:
        stated = re.search(r"\(default ([-+.\w]+)", text)
        if stated and kind in (int, float):
            assert kind(stated.group(1)) == defaults[dest], flag
            checked += 1
    assert checked >= 9
