"""Fixtures for the training tests: real (short) training runs through vaeserve.training.train, and
small bad-input files. Session-scoped runs are read-only; copy a checkpoint before altering it."""

import numpy as np
import pytest

TINY_EPOCHS = 4


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A 4-epoch VAE on digits with plots: (TrainResult, checkpoint directory)."""
    from vaeserve.training.train import TrainConfig, train

    out = tmp_path_factory.mktemp("runs") / "tiny"
    config = TrainConfig(epochs=TINY_EPOCHS, warmup_epochs=2, latent_dim=4, hidden=(64, 32), eval_samples=20)
    return train(config, out), out


@pytest.fixture(scope="session")
def ppca_run(tmp_path_factory):
    """PPCA (latent 8) on digits in closed form, no plots."""
    from vaeserve.training.train import TrainConfig, train

    out = tmp_path_factory.mktemp("runs") / "ppca"
    train(TrainConfig(model="ppca", latent_dim=8, plots=False, eval_samples=10), out)
    return out


@pytest.fixture(scope="session")
def trained_vae(tmp_path_factory):
    """A VAE trained long enough (40 epochs) that its posterior is informative: KL well above 0."""
    from vaeserve.training.train import TrainConfig, train

    out = tmp_path_factory.mktemp("runs") / "vae40"
    train(TrainConfig(epochs=40, plots=False, eval_samples=0), out)
    return out


@pytest.fixture
def write_csv(tmp_path):
    """write_csv(name, header, rows) -> path of a CSV file in tmp_path."""

    def write(name, header, rows):
        path = tmp_path / name
        lines = [",".join(header)] + [",".join(str(v) for v in row) for row in rows]
        path.write_text("\n".join(lines) + "\n")
        return path

    return write


@pytest.fixture
def table():
    """60 rows x 3 real-valued features (seeded)."""
    return np.random.default_rng(0).normal(size=(60, 3)).round(4)
