"""manifest.json: what a model version is, written last so its presence marks the version complete.

No torch here: the service reads manifests. The schema is documented in docs/model-repository.md;
`check_manifest` checks the parts the service relies on and says which key is wrong.
"""

import hashlib
import json
import os
from pathlib import Path

from vaeserve.errors import ArtifactError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
GRAPHS = ("encoder", "decoder")

# key -> type of the value, for the keys the service relies on.
_REQUIRED = {
    "schema_version": int,
    "name": str,
    "version": int,
    "created": str,
    "model": dict,
    "input": dict,
    "normalization": dict,
    "graphs": dict,
    "opset": int,
    "thresholds": dict,
}
_MODEL = {"kind": str, "arch": str, "latent_dim": int, "likelihood": str}
_INPUT = {"features": int, "dtype": str, "shape": list, "feature_names": list}
_GRAPH = {"file": str, "sha256": str, "inputs": list, "outputs": list}
_THRESHOLDS = {"score": str, "default": (int, float), "quantiles": dict}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path, manifest: dict) -> Path:
    """Write folder/manifest.json atomically: a reader sees no file or the whole file."""
    path = folder / MANIFEST
    tmp = folder / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(manifest, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_manifest(folder: Path) -> dict:
    """Read and check folder/manifest.json; ArtifactError naming the file when missing or corrupt."""
    path = folder / MANIFEST
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing; the version is incomplete") from None
    except OSError as err:
        raise ArtifactError(f"{path}: cannot be read ({err.strerror})") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path}: corrupt JSON ({err})") from None
    check_manifest(manifest, path)
    return manifest


def check_manifest(manifest, path: Path) -> None:
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path}: corrupt manifest: expected a JSON object")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ArtifactError(f"{path}: unsupported schema_version {version!r}; this vaeserve reads {SCHEMA_VERSION}")
    _check_keys(manifest, _REQUIRED, path, "")
    _check_keys(manifest["model"], _MODEL, path, "model.")
    _check_keys(manifest["input"], _INPUT, path, "input.")
    _check_keys(manifest["thresholds"], _THRESHOLDS, path, "thresholds.")
    for graph in GRAPHS:
        if not isinstance(manifest["graphs"].get(graph), dict):
            raise ArtifactError(f"{path}: corrupt manifest: graphs.{graph} is missing")
        _check_keys(manifest["graphs"][graph], _GRAPH, path, f"graphs.{graph}.")
    labels = manifest.get("labels")
    if manifest["model"]["kind"] == "cvae" and not (isinstance(labels, dict) and labels.get("names") and labels.get("prior")):
        raise ArtifactError(f"{path}: corrupt manifest: a cvae needs labels.names and labels.prior")


def _check_keys(section: dict, expected: dict, path: Path, prefix: str) -> None:
    for key, kind in expected.items():
        if key not in section:
            raise ArtifactError(f"{path}: corrupt manifest: {prefix}{key} is missing")
        value = section[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ArtifactError(f"{path}: corrupt manifest: {prefix}{key} has the wrong type ({type(value).__name__})")
