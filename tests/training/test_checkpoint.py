"""A saved checkpoint rebuilds the same model; a resumed run continues the same history."""

import json
import shutil

import numpy as np
import pytest
import torch

from vaeserve.errors import ConfigError
from vaeserve.training.checkpoint import load_checkpoint
from vaeserve.training.train import TRAINING_STATE, TrainConfig, train


def test_reloaded_checkpoint_gives_identical_outputs(tiny_run):
    result, out = tiny_run
    first, second = load_checkpoint(out), load_checkpoint(out)
    x_raw, _ = first.validation_rows()
    x = torch.from_numpy(first.data.normalization.apply(x_raw))
    with torch.no_grad():
        mu1, logvar1 = first.model.encoder(x)
        mu2, logvar2 = second.model.encoder(x)
        (logits1,) = first.model.decoder(mu1)
        (logits2,) = second.model.decoder(mu2)
    assert torch.equal(mu1, mu2) and torch.equal(logvar1, logvar2) and torch.equal(logits1, logits2)
    # and it is the model whose validation -ELBO the run recorded as best
    best = min(h["val_neg_elbo"] for h in result.metrics["history"])
    assert result.metrics["best_epoch"] == 1 + [h["val_neg_elbo"] for h in result.metrics["history"]].index(best)
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["normalization"] == "minmax" and config["train"]["likelihood"] == "bernoulli"
    assert config["data"]["class_prior"] is not None and abs(sum(config["data"]["class_prior"]) - 1) < 1e-9
    assert np.allclose(first.data.normalization.shift, 0.0)  # digits' minimum pixel value is 0 in training


def test_resume_continues_the_run(tmp_path):
    settings = dict(epochs=2, warmup_epochs=1, latent_dim=2, hidden=(32, 16), plots=False, eval_samples=0, patience=50)
    straight = train(TrainConfig(**dict(settings, epochs=4)), tmp_path / "straight").metrics["history"]
    out = tmp_path / "resumed"
    first = train(TrainConfig(**settings), out).metrics["history"]
    assert len(first) == 2 and (out / TRAINING_STATE).is_file()
    resumed = train(TrainConfig(**dict(settings, epochs=4)), out, resume=True).metrics["history"]
    assert [h["epoch"] for h in resumed] == [1, 2, 3, 4]
    assert resumed[:2] == first
    # optimizer, batch order and noise all restored: the same numbers as a run that never stopped
    for a, b in zip(resumed, straight):
        assert a["val_neg_elbo"] == b["val_neg_elbo"] and a["train_neg_elbo"] == b["train_neg_elbo"]
    # A run from before the calibration split would split its rows differently when resumed: refused.
    config = json.loads((out / "config.json").read_text())
    del config["train"]["calibration_fraction"]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="before rows were held out for calibration: resuming would split its rows"):
        train(TrainConfig(**dict(settings, epochs=6)), out, resume=True)
    shutil.rmtree(tmp_path)
