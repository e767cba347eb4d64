"""A private copy of a version folder, and rewriting its manifest, for the artifact tests."""

import json
import shutil

import pytest

from vaeserve.artifact.manifest import MANIFEST


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
