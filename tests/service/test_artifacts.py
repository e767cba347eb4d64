"""Tampered model versions against the real runtime and a real server: each is refused with one line
naming the file and the reason, and the versions left intact still serve. The tamperer rewrites the
manifest's sha256 after editing a graph, so the hashes alone do not catch them."""

import json
import logging
import re
import shutil
from dataclasses import dataclass
from typing import Callable

import grpc
import numpy as np
import pytest

from vaeserve.artifact.manifest import MANIFEST, file_sha256
from vaeserve.artifact.repository import load_version, scan_repository
from vaeserve.artifact.runtime import Model
from vaeserve.errors import ArtifactError
from vaeserve.service.client import Client

EXIT_TIMEOUT = 60  # seconds for `vaeserve serve` to give up on a repository with nothing valid


def replace_graph(folder, manifest, graph: str, data: bytes) -> None:
    """Write new bytes as a graph and record their sha256, as a careful tamperer would."""
    path = folder / manifest["graphs"][graph]["file"]
    path.write_bytes(data)
    manifest["graphs"][graph]["sha256"] = file_sha256(path)


def foreign_encoder(folder, manifest, source):
    # The cvae's encoder: same x width, and an extra input y [N, 10] the vae's manifest does not list.
    replace_graph(folder, manifest, "encoder", (source / "cvae" / "1" / "encoder.onnx").read_bytes())


def latent_dim_only(folder, manifest, source):
    manifest["model"]["latent_dim"] = 5


def latent_dim_everywhere(folder, manifest, source):
    # latent_dim and every latent tensor of the graphs' entries: the manifest agrees with itself, not with the graphs.
    manifest["model"]["latent_dim"] = 5
    for tensor in (*manifest["graphs"]["encoder"]["outputs"], manifest["graphs"]["decoder"]["inputs"][0]):
        tensor["shape"] = [-1, 5]


def latent_dim_wide(folder, manifest, source):
    # As latent_dim_everywhere, at a width that would raise the server's message limits to ~300 MiB.
    manifest["model"]["latent_dim"] = 20_000
    for tensor in (*manifest["graphs"]["encoder"]["outputs"], manifest["graphs"]["decoder"]["inputs"][0]):
        tensor["shape"] = [-1, 20_000]


def garbage_decoder(folder, manifest, source):
    replace_graph(folder, manifest, "decoder", b"\x08\x07garbage, not a protobuf" * 64)


def nan_threshold(folder, manifest, source):
    manifest["thresholds"]["default"] = float("nan")  # json.dumps writes the literal NaN


def short_scale(folder, manifest, source):
    manifest["normalization"]["scale"] = manifest["normalization"]["scale"][:-1]


def poisson(folder, manifest, source):
    manifest["scoring"]["likelihood"] = "poisson"


def zero_scale(folder, manifest, source):
    manifest["normalization"]["scale"][10] = 0.0


def absolute_encoder(folder, manifest, source):
    # Version 1's encoder, whose sha256 the manifest already lists.
    manifest["graphs"]["encoder"]["file"] = str(folder.parent / "1" / "encoder.onnx")


def encoder_linked_outside(folder, manifest, source):
    outside = folder.parent.parent.parent / "outside" / "encoder.onnx"  # beside the repository
    outside.parent.mkdir(exist_ok=True)
    shutil.move(folder / "encoder.onnx", outside)  # same bytes, same sha256
    (folder / "encoder.onnx").symlink_to(outside)


@dataclass(frozen=True)
class Damage:
    model: str
    version: int
    damage: Callable
    refused_by: str  # "load_version" (manifest and files) or "Model" (ONNX Runtime)
    file: str  # the file the message names
    reason: str  # a regex of what the message says about it

    @property
    def id(self) -> str:
        return f"{self.model}/{self.version}-{self.damage.__name__}"


# vae version 1 stays intact and is the only valid version; "other" has no valid version at all.
DAMAGES = [
    Damage("vae", 2, foreign_encoder, "Model", "encoder.onnx", r"declares inputs \['x', 'y'\], the manifest \['x'\]$"),
    Damage("vae", 3, latent_dim_only, "load_version", MANIFEST,
           r"corrupt manifest: graphs\.encoder\.outputs are not this model's: expected mu \[-1, 5\], logvar \[-1, 5\]$"),
    Damage("vae", 4, latent_dim_everywhere, "Model", "decoder.onnx",
           r"z is tensor\(float\) \['batch', 4\]; the manifest says float32 \[batch, 5\]$"),
    Damage("vae", 10, latent_dim_wide, "Model", "decoder.onnx",
           r"z is tensor\(float\) \['batch', 4\]; the manifest says float32 \[batch, 20000\]$"),
    Damage("other", 1, garbage_decoder, "Model", "decoder.onnx", r"ONNX Runtime cannot load it \(.+\)$"),
    Damage("vae", 5, nan_threshold, "load_version", MANIFEST, r"corrupt manifest: thresholds\.default must be finite, got nan$"),
    Damage("vae", 6, short_scale, "load_version", MANIFEST,
           r"corrupt manifest: normalization\.scale: 63 values for 64 features$"),
    Damage("other", 2, poisson, "load_version", MANIFEST, r"corrupt manifest: scoring\.likelihood is 'poisson'; expected one of "),
    Damage("vae", 7, zero_scale, "load_version", MANIFEST,
           r"corrupt manifest: normalization\.scale: every value must be > 0 \(feature 10 is 0\)$"),
    Damage("vae", 8, absolute_encoder, "load_version", MANIFEST,
           r"corrupt manifest: graphs\.encoder\.file '/.+' must be a file name inside the version folder$"),
    Damage("vae", 9, encoder_linked_outside, "load_version", "encoder.onnx", r"links outside its version folder"),
]


@pytest.fixture(scope="module")
def damaged_repository(model_repository, tmp_path_factory):
    """models/vae/1 intact, and every damage of DAMAGES in its own version folder."""
    root = tmp_path_factory.mktemp("damaged") / "models"
    shutil.copytree(model_repository / "vae" / "1", root / "vae" / "1")
    for case in DAMAGES:
        folder = root / case.model / str(case.version)
        shutil.copytree(model_repository / "vae" / "1", folder)
        path = folder / MANIFEST
        manifest = json.loads(path.read_text()) | {"name": case.model, "version": case.version}
        case.damage(folder, manifest, model_repository)
        path.write_text(json.dumps(manifest, indent=2))
    return root


def folder_of(root, case: Damage):
    return root / case.model / str(case.version)


@pytest.mark.parametrize("case", DAMAGES, ids=lambda case: case.id)
def test_each_damage_is_refused_naming_the_file(damaged_repository, case):
    folder = folder_of(damaged_repository, case)
    if case.refused_by == "load_version":
        with pytest.raises(ArtifactError) as failure:
            load_version(folder)
    else:
        version = load_version(folder)  # past the manifest and the hashes: ONNX Runtime's turn
        assert (version.name, version.version) == (case.model, case.version)
        with pytest.raises(ArtifactError) as failure:
            Model(version)
    message = str(failure.value)
    assert message.startswith(f"{folder / case.file}: "), message
    assert re.search(case.reason, message), message


def test_scan_skips_the_manifest_damages_with_one_line_each(damaged_repository, caplog):
    with caplog.at_level(logging.ERROR, logger="vaeserve.artifact.repository"):
        models = scan_repository(damaged_repository)
    # What the manifests and hashes cannot tell goes on to ONNX Runtime; vae 1 is the only intact one.
    opened_later = [case for case in DAMAGES if case.refused_by == "Model"]
    assert {name: sorted(versions) for name, versions in models.items()} == {
        "vae": [1] + [case.version for case in opened_later if case.model == "vae"],
        "other": [case.version for case in opened_later if case.model == "other"],
    }
    lines = [record.getMessage() for record in caplog.records]
    refused = [case for case in DAMAGES if case.refused_by == "load_version"]
    assert len(lines) == len(refused)
    for case in refused:
        folder = folder_of(damaged_repository, case)
        (line,) = [line for line in lines if line.startswith(f"skipping {folder}: ")]
        assert line.startswith(f"skipping {folder}: {folder / case.file}: ") and re.search(case.reason, line), line


def skipping_lines(log: str) -> dict:
    """{version folder: the one 'skipping' line about it}; fails on a folder named twice."""
    lines = [line for line in log.splitlines() if "skipping " in line]
    by_folder = {}
    for line in lines:
        folder = line.split("skipping ", 1)[1].split(": ", 1)[0]
        assert folder not in by_folder, f"{folder} skipped twice:\n{by_folder[folder]}\n{line}"
        by_folder[folder] = line
    return by_folder


def test_server_serves_only_the_intact_version(damaged_repository, start_server, rows, tmp_path):
    x, _ = rows
    expected = Model(load_version(damaged_repository / "vae" / "1"))
    server = start_server(damaged_repository, log=tmp_path / "serve.log")
    try:
        server.wait_serving()
        with Client(server.target) as client:
            assert client.models() == {"vae": [1]}
            newest, first = client.score("vae", x), client.score("vae", x, version=1)
            with pytest.raises(grpc.RpcError) as failure:
                client.score("vae", x, version=2)
            assert failure.value.code() == grpc.StatusCode.NOT_FOUND
            # The message limits follow from the intact version alone, not from vae/10's claimed 20000
            # latent dimensions: 3 MB is past them.
            with pytest.raises(grpc.RpcError) as failure:
                client.score("vae", x[:1], labels=["x" * 3_000_000])
            assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        exit_code = server.stop()
    assert exit_code == 0

    scores = expected.scorer.score(x)
    threshold = expected.manifest.thresholds.default
    for result in (newest, first):
        assert result.neg_elbo.shape == (len(x),) and np.isfinite(result.neg_elbo).all()
        np.testing.assert_allclose(result.neg_elbo, scores.neg_elbo, rtol=1e-5)
        np.testing.assert_allclose(result.anomaly_score, scores.anomaly_score, rtol=1e-5)
        assert result.threshold == threshold
        assert np.array_equal(result.is_anomaly, result.anomaly_score > threshold)

    log = server.log_text()
    assert "Traceback" not in log, log
    lines = skipping_lines(log)
    assert sorted(lines) == sorted(str(folder_of(damaged_repository, case)) for case in DAMAGES), log
    for case in DAMAGES:
        folder = folder_of(damaged_repository, case)
        line = lines[str(folder)]
        assert f"skipping {folder}: {folder / case.file}: " in line and re.search(case.reason, line), line


def output_of_exit_2(start_server, root, log, **settings) -> str:
    """Start `vaeserve serve` on a repository with nothing valid: it exits 2, without a traceback; its output."""
    server = start_server(root, log=log, **settings)
    try:
        assert server.process.wait(EXIT_TIMEOUT) == 2
    finally:
        server.stop()
    output = server.log_text()
    assert "Traceback" not in output, output
    return output


def test_server_with_no_valid_version_exits_2_with_one_line(damaged_repository, start_server, tmp_path):
    root = tmp_path / "models"
    shutil.copytree(damaged_repository, root, symlinks=True)  # the outside link stays a link
    shutil.rmtree(root / "vae" / "1")
    output = output_of_exit_2(start_server, root, tmp_path / "serve.log")
    lines = output.strip().splitlines()
    assert lines[-1] == (f"vaeserve serve: error: no valid model version under {root}; "
                         "the log says why each was skipped"), output  # fmt: skip
    assert sum("no valid model version" in line for line in lines) == 1, output
    assert sorted(skipping_lines(output)) == sorted(str(folder_of(root, case)) for case in DAMAGES), output


def test_workers_with_no_valid_version_exit_2(damaged_repository, start_server, tmp_path):
    """--workers 2 where the versions fail only when opened: each worker finds nothing, the command exits 2."""
    root = tmp_path / "models"
    shutil.copytree(damaged_repository / "other", root / "other")  # garbage ONNX behind a matching sha256
    output = output_of_exit_2(start_server, root, tmp_path / "serve.log", workers=2)
    assert output.count("no valid model version") == 2, output  # one line from each worker
