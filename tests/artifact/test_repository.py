"""The loader the service uses: verifies graphs, refuses altered or corrupt versions, skips incomplete ones."""

import json
import logging
import shutil
import subprocess
import sys

import pytest

from vaeserve.errors import ArtifactError, ModelNotFound
from vaeserve.artifact.repository import ModelVersion, load_version, newest, scan_repository


@pytest.fixture
def repository(model_repository, tmp_path):
    """A private copy, free to damage."""
    root = tmp_path / "models"
    shutil.copytree(model_repository, root)
    return root


def test_scan_loads_every_model(model_repository):
    models = scan_repository(model_repository)
    assert sorted(models) == ["cvae", "ppca", "vae"]
    vae = models["vae"][1]
    assert isinstance(vae, ModelVersion) and (vae.name, vae.version) == ("vae", 1)
    assert vae.encoder_path == model_repository / "vae" / "1" / "encoder.onnx"
    assert vae.decoder_path == model_repository / "vae" / "1" / "decoder.onnx"
    assert vae.manifest.model.kind == "vae"


def test_altered_graph_is_refused_naming_the_file(repository, caplog):
    path = repository / "vae" / "1" / "encoder.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one byte
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"encoder\.onnx: sha256 [0-9a-f]{64} does not match the manifest"):
        load_version(repository / "vae" / "1")
    with caplog.at_level(logging.ERROR):
        models = scan_repository(repository)
    assert "vae" not in models and sorted(models) == ["cvae", "ppca"]
    assert "encoder.onnx: sha256" in caplog.text


def test_missing_graph_is_refused(repository):
    (repository / "ppca" / "1" / "decoder.onnx").unlink()
    with pytest.raises(ArtifactError, match=r"decoder\.onnx: missing"):
        load_version(repository / "ppca" / "1")


def test_version_without_manifest_is_skipped_with_a_log_line(repository, caplog):
    shutil.copytree(repository / "vae" / "1", repository / "vae" / "2")
    (repository / "vae" / "2" / "manifest.json").unlink()
    with caplog.at_level(logging.WARNING):
        models = scan_repository(repository)
    assert list(models["vae"]) == [1]
    assert newest(models["vae"]).version == 1
    assert any("vae/2" in r.getMessage() and "no manifest.json" in r.getMessage() for r in caplog.records)
    with pytest.raises(ArtifactError, match=r"manifest\.json: missing"):
        load_version(repository / "vae" / "2")


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda text: text[: len(text) // 2], r"manifest\.json: corrupt JSON"),
        (lambda text: "[]", r"manifest\.json: corrupt manifest: expected a JSON object"),
        (lambda text: text.replace('"schema_version": 4', '"schema_version": 99'), "schema_version 99 is not supported"),
        (lambda text: text.replace('"latent_dim"', '"latent_size"'), r"corrupt manifest: model\.latent_dim is missing"),
        (lambda text: text.replace('"opset": 18', '"opset": "18"'), "opset has the wrong type"),
    ],
)
def test_corrupt_manifest_is_refused_with_a_clear_message(repository, caplog, damage, message):
    path = repository / "ppca" / "1" / "manifest.json"
    path.write_text(damage(path.read_text()))
    with pytest.raises(ArtifactError, match=message) as failure:
        load_version(path.parent)
    assert str(path) in str(failure.value)
    with caplog.at_level(logging.ERROR):
        assert "ppca" not in scan_repository(repository)
    assert "manifest.json" in caplog.text


def test_newest_valid_version_is_picked(repository):
    model = repository / "cvae"
    for number in (2, 3):
        shutil.copytree(model / "1", model / str(number))
        manifest = json.loads((model / str(number) / "manifest.json").read_text())
        (model / str(number) / "manifest.json").write_text(json.dumps(manifest | {"version": number}))
    (model / "3" / "decoder.onnx").write_bytes(b"not a graph")  # newest, but altered
    (model / ".export-4-abc").mkdir()  # an export in progress is never looked at
    versions = scan_repository(repository)["cvae"]
    assert sorted(versions) == [1, 2]
    assert newest(versions).version == 2 and newest(versions).path == model / "2"
    with pytest.raises(ModelNotFound):
        newest({})


def test_manifest_version_must_match_its_folder(repository):
    shutil.copytree(repository / "vae" / "1", repository / "vae" / "5")
    with pytest.raises(ArtifactError, match="says version 1, but its folder is 5"):
        load_version(repository / "vae" / "5")


def test_missing_repository_is_an_error(tmp_path):
    with pytest.raises(ArtifactError, match="model repository not found"):
        scan_repository(tmp_path / "nowhere")


def test_loader_does_not_import_torch():
    code = "import sys, vaeserve.artifact.runtime; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
