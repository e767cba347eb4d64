"""Every model kind and architecture exports with ONNX Runtime matching torch at batch 1, 7 and 256."""

import json

import numpy as np
import onnx
import pytest
import torch

from vaeserve.export.exporter import export_checkpoint
from vaeserve.artifact.runtime import Graph
from vaeserve.training.checkpoint import load_checkpoint

CASES = [
    ("vae", "mlp", "bernoulli"),
    ("vae", "mlp", "gaussian"),
    ("vae", "conv", "gaussian-fixed"),
    ("cvae", "mlp", "gaussian"),
    ("cvae", "conv", "bernoulli"),
    ("ppca", "mlp", "gaussian"),
]


@pytest.fixture(scope="module")
def exported(make_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    versions = {}
    for kind, arch, likelihood in CASES:
        name = f"{kind}-{arch}-{likelihood}"
        # Conv models stay at random init: parity is about the graphs, and conv training is slow on 2 cores.
        steps = 0 if arch == "conv" else 50
        checkpoint = make_checkpoint(name, kind=kind, arch=arch, likelihood=likelihood, steps=steps, validation_rows=64)
        versions[name] = (checkpoint, export_checkpoint(checkpoint, root, name))
    return versions


@pytest.mark.parametrize("kind,arch,likelihood", CASES)
@pytest.mark.parametrize("batch", [1, 7, 256])
def test_onnx_runtime_matches_torch(exported, kind, arch, likelihood, batch):
    checkpoint_path, version = exported[f"{kind}-{arch}-{likelihood}"]
    checkpoint = load_checkpoint(checkpoint_path)
    model = checkpoint.model
    raw, labels = checkpoint.validation_rows()
    index = np.arange(batch) % raw.shape[0]
    x = checkpoint.data.normalization.apply(raw[index])
    y = np.eye(10, dtype=np.float32)[labels[index]] if kind == "cvae" else None
    z = np.random.default_rng(batch).standard_normal((batch, model.config.latent_dim)).astype(np.float32)
    cases = [(model.encoder, version.encoder_path, {"x": x}), (model.decoder, version.decoder_path, {"z": z})]
    for module, path, feeds in cases:
        if y is not None:
            feeds["y"] = y
        got = Graph(path, version.manifest.graphs[path.stem]).run(feeds)
        with torch.no_grad():
            want = module(*(torch.from_numpy(v) for v in feeds.values()))
        assert list(got) == [o.name for o in version.manifest.graphs[path.stem].outputs]
        for name, expected in zip(got, want):
            assert got[name].shape == tuple(expected.shape)
            assert got[name].shape[0] == batch
            assert np.max(np.abs(got[name] - expected.numpy())) < 1e-4, f"{path.name} {name}"


@pytest.mark.parametrize("kind,arch,likelihood", CASES)
def test_manifest_records_parity_and_graph_interface(exported, kind, arch, likelihood):
    _, version = exported[f"{kind}-{arch}-{likelihood}"]
    manifest = json.loads((version.path / "manifest.json").read_text())
    outputs = {"bernoulli": ["x_logits"]}.get(likelihood, ["x_mean", "x_logvar"])
    label = ["y"] if kind == "cvae" else []
    assert [t["name"] for t in manifest["graphs"]["encoder"]["inputs"]] == ["x", *label]
    assert [t["name"] for t in manifest["graphs"]["encoder"]["outputs"]] == ["mu", "logvar"]
    assert [t["name"] for t in manifest["graphs"]["decoder"]["inputs"]] == ["z", *label]
    assert [t["name"] for t in manifest["graphs"]["decoder"]["outputs"]] == outputs
    parity = manifest["parity"]
    assert parity["batch_sizes"] == [1, 7, 256]
    assert parity["tolerance"] == 1e-4
    assert set(parity["max_abs_diff"]) == {"encoder.mu", "encoder.logvar", *(f"decoder.{o}" for o in outputs)}
    assert all(0.0 <= d < 1e-4 for d in parity["max_abs_diff"].values())
    assert manifest["model"] == {"kind": kind, "arch": arch, "latent_dim": 4}
    assert manifest["scoring"]["likelihood"] == likelihood
    for graph in ("encoder", "decoder"):
        model = onnx.load(version.path / f"{graph}.onnx")
        onnx.checker.check_model(model)
        assert model.opset_import[0].version == manifest["opset"] == 18
        for tensor in [*model.graph.input, *model.graph.output]:
            assert tensor.type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch axis


def test_dynamo_exporter_gives_the_same_interface(exported, tmp_path):
    checkpoint, _ = exported["cvae-mlp-gaussian"]
    version = export_checkpoint(checkpoint, tmp_path, "dynamo", exporter="dynamo")
    assert version.manifest.exporter == "dynamo"
    assert max(version.manifest.parity.max_abs_diff.values()) < 1e-4
    decoder = Graph(version.decoder_path, version.manifest.decoder)
    assert (decoder.inputs, decoder.outputs) == (["z", "y"], ["x_mean", "x_logvar"])
