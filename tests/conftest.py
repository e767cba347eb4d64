"""Shared fixtures: tiny checkpoints built without the training loop, and a model repository
exported from them.

    make_checkpoint(name, **ModelConfig overrides) -> Path   a checkpoint on digits (cached per name)
    model_repository -> Path   models `vae` (MLP, bernoulli), `cvae` (MLP, bernoulli, 10 classes) and
                               `ppca` (closed-form, gaussian, latent 8), each version 1

Session-scoped: treat them as read-only; copy a version folder before altering it.
"""

import numpy as np
import pytest

TRAIN_STEPS = 150  # enough to move off random init; each model takes well under a second


@pytest.fixture(scope="session")
def digits():
    """The built-in digits with a fixed 80/10/10 split: (dataset, train, validation, calibration indices)."""
    from vaeserve.training.data import load_dataset, split

    data = load_dataset("digits")
    return data, *split(data, 0.1, seed=0, calibration_fraction=0.1)


def build_checkpoint(path, digits, steps: int = TRAIN_STEPS, validation_rows: int | None = None, **overrides):
    """Fit a model on digits (a few Adam steps of the ELBO, or PPCA in closed form) and save it as a
    checkpoint; `validation_rows` keeps only the first held-out rows (faster export calibration)."""
    import torch

    from vaeserve.normalization import Normalizer
    from vaeserve.training.checkpoint import CALIBRATION, REFERENCE, VALIDATION, DataSchema, save_checkpoint, save_rows
    from vaeserve.training.model import ModelConfig, build_model, elbo_loss
    from vaeserve.training.train import fit_support

    data, train, val, cal = digits
    settings = {"input_dim": data.x.shape[1], "image_shape": data.image_shape, "latent_dim": 4, "hidden": (64, 32)}
    settings |= overrides
    if settings.get("kind") == "cvae":
        settings.setdefault("num_classes", len(data.label_names))
    if settings.get("kind") == "ppca":
        settings.setdefault("likelihood", "gaussian")
    config = ModelConfig(**settings)
    # Bernoulli needs values in [0, 1]; Gaussians get standardised rows.
    normalizer = Normalizer.fit("minmax" if config.likelihood == "bernoulli" else "standardize", data.x[train])
    x = torch.from_numpy(normalizer.apply(data.x[train]))
    y = torch.eye(len(data.label_names))[torch.from_numpy(data.y[train])] if config.conditional else None

    torch.manual_seed(0)
    model = build_model(config)
    if config.kind == "ppca":
        model.fit(x.numpy())
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
        generator = torch.Generator().manual_seed(0)
        for _ in range(steps):
            batch = torch.randint(0, x.shape[0], (128,), generator=generator)
            loss = elbo_loss(model, x[batch], None if y is None else y[batch])["loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()

    counts = np.bincount(data.y[train], minlength=len(data.label_names))
    schema = DataSchema(
        name=data.name, source="digits", feature_names=data.feature_names, normalization=normalizer,
        image_shape=data.image_shape, label_names=data.label_names, class_prior=(counts / counts.sum()).tolist(),
        support=fit_support(data.x[np.sort(np.concatenate([train, val]))], data.image_shape is not None),
    )
    save_checkpoint(path, model, schema, train={"steps": steps}, metrics={})
    val = val[:validation_rows]
    save_rows(path, VALIDATION, data.x[val], data.y[val])
    save_rows(path, CALIBRATION, data.x[cal], data.y[cal])
    save_rows(path, REFERENCE, data.x[train])
    return path


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory, digits):
    made = {}

    def make(name: str, **overrides):
        if name not in made:
            made[name] = build_checkpoint(tmp_path_factory.mktemp("checkpoints") / name, digits, **overrides)
        return made[name]

    return make


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory, make_checkpoint):
    from vaeserve.export.exporter import export_checkpoint

    root = tmp_path_factory.mktemp("models")
    export_checkpoint(make_checkpoint("vae", kind="vae"), root, "vae")
    export_checkpoint(make_checkpoint("cvae", kind="cvae"), root, "cvae")
    export_checkpoint(make_checkpoint("ppca", kind="ppca", latent_dim=8), root, "ppca")
    return root
