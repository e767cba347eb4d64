"""For the artifact tests: the shared repository's versions opened, their held-out rows, a private copy of a
version folder, and rewriting its manifest."""

import json
import shutil

import numpy as np
import pytest

from vaeserve.artifact.manifest import MANIFEST
from vaeserve.artifact.repository import load_version
from vaeserve.artifact.runtime import Model
from vaeserve.training.checkpoint import load_checkpoint

MODELS = ("vae", "cvae", "ppca")  # the shared repository's models with a score graph


@pytest.fixture(scope="module")
def models(model_repository):
    return {name: Model(load_version(model_repository / name / "1")) for name in MODELS}


@pytest.fixture(scope="module")
def held_out(make_checkpoint):
    """Raw held-out rows and their one-hot labels, per model."""
    out = {}
    for name in MODELS:
        raw, y = load_checkpoint(make_checkpoint(name)).validation_rows()
        out[name] = (raw.astype(np.float32), np.eye(10, dtype=np.float32)[y.astype(np.int64)])
    return out


@pytest.fixture
def version(model_repository, tmp_path):
    """A private copy of vae version 1, inside tmp_path/models/vae/1."""
    folder = tmp_path / "models" / "vae" / "1"
    shutil.copytree(model_repository / "vae" / "1", folder)
    return folder


@pytest.fixture
def rewrite():
    """rewrite(folder, change): apply `change` to folder's manifest dict and write it back (NaN and
    Infinity as JSON literals); returns the new dict."""

    def rewrite(folder, change):
        path = folder / MANIFEST
        manifest = json.loads(path.read_text())
        change(manifest)
        path.write_text(json.dumps(manifest, indent=2))
        return manifest

    return rewrite
