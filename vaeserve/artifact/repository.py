"""The model repository: `<root>/<name>/<version>/{encoder.onnx, decoder.onnx, score.onnx, manifest.json}`
(score.onnx in versions exported since manifest schema 3).

No torch, no ONNX Runtime here. A version folder is a positive integer. It is complete when
manifest.json exists (export writes it last); its files are valid when the manifest reads and checks
(vaeserve.artifact.manifest) and each graph is a file inside the folder whose sha256 matches the
manifest. Folders starting with "." are exports in progress and are never looked at. Opening the graphs
in ONNX Runtime and checking them against the manifest is vaeserve.artifact.runtime's part.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

from vaeserve.artifact.manifest import MANIFEST, Manifest, file_sha256, read_manifest
from vaeserve.errors import ArtifactError, ModelNotFound

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: int
    path: Path
    manifest: Manifest

    @property
    def encoder_path(self) -> Path:
        return self.path / self.manifest.encoder.file

    @property
    def decoder_path(self) -> Path:
        return self.path / self.manifest.decoder.file

    @property
    def score_path(self) -> Path | None:
        """The score graph; None in a version exported without one."""
        return None if self.manifest.score is None else self.path / self.manifest.score.file

    @property
    def neighbours_path(self) -> Path | None:
        """The neighbour graph; None in a version exported without one."""
        return None if self.manifest.neighbours is None else self.path / self.manifest.neighbours.file


def load_version(path: str | Path) -> ModelVersion:
    """Load and verify one version folder; ArtifactError naming the file that is missing, corrupt or altered."""
    path = Path(path)
    manifest = read_manifest(path)
    if path.name.isdigit() and int(path.name) != manifest.version:
        raise ArtifactError(f"{path / MANIFEST}: says version {manifest.version}, but its folder is {path.name}")
    folder = path.resolve()
    for graph, entry in manifest.graphs.items():
        file = path / entry.file
        if not file.is_file():
            raise ArtifactError(f"{file}: missing; the manifest lists it as the {graph} graph")
        if not file.resolve().is_relative_to(folder):
            raise ArtifactError(f"{file}: links outside its version folder; a version's graphs live inside it")
        actual = file_sha256(file)
        if actual != entry.sha256:
            raise ArtifactError(f"{file}: sha256 {actual} does not match the manifest ({entry.sha256}); the graph was altered")
    return ModelVersion(manifest.name, manifest.version, path, manifest)


def version_folders(model_dir: Path) -> dict[int, Path]:
    """Every numbered version folder of a model, complete or not."""
    if not model_dir.is_dir():
        return {}
    return {int(p.name): p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) > 0}


def next_version(model_dir: Path) -> int:
    """One above the highest numbered folder, incomplete ones included, so no number is reused."""
    return max(version_folders(model_dir), default=0) + 1


def scan_repository(root: str | Path) -> dict[str, dict[int, ModelVersion]]:
    """Every valid version of every model under root, by name and version.

    A version folder without manifest.json is incomplete: skipped with a warning. A version whose
    manifest or graphs are corrupt or altered is skipped with one error line naming the file and the
    reason, so one bad version never keeps the others from serving. Models without a valid version
    are left out.
    """
    root = Path(root)
    if not root.is_dir():
        raise ArtifactError(f"{root}: model repository not found")
    models: dict[str, dict[int, ModelVersion]] = {}
    for model_dir in sorted(root.iterdir()):
        if not model_dir.is_dir() or model_dir.name.startswith("."):
            continue
        versions = {}
        for number, folder in sorted(version_folders(model_dir).items()):
            if not (folder / MANIFEST).exists():
                log.warning("skipping %s: no %s, the version is incomplete", folder, MANIFEST)
                continue
            try:
                loaded = load_version(folder)
            except ArtifactError as err:
                log.error("skipping %s: %s", folder, err)
                continue
            if loaded.name != model_dir.name:
                log.error("skipping %s: %s names model %r, but its folder is %r", folder, MANIFEST, loaded.name, model_dir.name)
                continue
            versions[number] = loaded
        if versions:
            models[model_dir.name] = versions
    return models


def newest(versions: dict[int, ModelVersion]) -> ModelVersion:
    """The highest-numbered of a model's valid versions."""
    if not versions:
        raise ModelNotFound("no valid version")
    return versions[max(versions)]
