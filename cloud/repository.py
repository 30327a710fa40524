"""Where a server's models come from: model folders and model repositories, re-read on reload.

A *model repository* is a folder of model folders. Two layouts are accepted, mixed freely::

    repository/
      vit-a/                 a model folder (manifest.json + server.onnx)
      vit-b/
        1/                   versions of one model: each a model folder
        2/

Every model folder found is served; exports of the same name are told apart by their manifest
sha256, which the edge sends with each request. Folders whose name starts with "." are skipped, so
a deployment tool can stage a new version in ``.staging/`` and rename it into place.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from splitinfer.protos import ManifestError, sha256_file

from .registry import LoadedModel, ModelRegistry, RuntimeConfig, load_model

__all__ = ["MANIFEST_NAME", "find_model_folders", "ModelSource"]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"


def find_model_folders(repository: str | Path) -> list[Path]:
    """Model folders in ``repository`` (children and grandchildren holding a manifest.json), sorted.

    Raises ManifestError when ``repository`` is not a folder.
    """
    root = Path(repository)
    if not root.is_dir():
        raise ManifestError(f"model repository {root} is not a folder")
    found: list[Path] = []
    for child in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if (child / MANIFEST_NAME).is_file():
            found.append(child)
            continue
        found.extend(sorted(v for v in child.iterdir()
                            if v.is_dir() and not v.name.startswith(".") and (v / MANIFEST_NAME).is_file()))
    return found


@dataclass(frozen=True)
class ModelSource:
    """Model folders given one by one plus model repositories scanned on every load.

    ``load`` builds a :class:`ModelRegistry`; given the registry it replaces, it keeps the already
    loaded sessions of unchanged exports (same folder, same manifest sha256), so a reload costs only
    the new models.
    """

    folders: tuple[Path, ...] = ()
    repositories: tuple[Path, ...] = ()
    runtime: RuntimeConfig = RuntimeConfig()

    def __post_init__(self) -> None:
        object.__setattr__(self, "folders", tuple(Path(f) for f in self.folders))
        object.__setattr__(self, "repositories", tuple(Path(r) for r in self.repositories))
        if not self.folders and not self.repositories:
            raise ValueError("give at least one model folder or model repository")

    def model_folders(self) -> list[Path]:
        """Every model folder to serve, explicit folders first; ManifestError if a repository is missing."""
        folders = list(self.folders)
        for repository in self.repositories:
            found = find_model_folders(repository)
            if not found:
                logger.warning("model repository %s holds no model folder", repository)
            folders.extend(found)
        return folders

    def load(self, previous: ModelRegistry | None = None) -> ModelRegistry:
        """Load every model folder; ManifestError or ValueError when any is unusable.

        Nothing is half-applied: on error the caller keeps serving ``previous``.
        """
        reusable = _by_folder(previous or ())
        models: list[LoadedModel] = []
        for folder in self.model_folders():
            old = reusable.get(folder.resolve())
            if old is not None and _manifest_sha256(folder) == old.manifest.sha256:
                models.append(old)
            else:
                models.append(load_model(folder, self.runtime))
        if not models:
            raise ValueError("no model folder found: "
                             + ", ".join(str(p) for p in (*self.folders, *self.repositories)))
        return ModelRegistry(models)


def _by_folder(models: Iterable[LoadedModel]) -> dict[Path, LoadedModel]:
    return {Path(m.manifest.folder).resolve(): m for m in models}


def _manifest_sha256(folder: Path) -> str | None:
    path = folder / MANIFEST_NAME
    try:
        return sha256_file(path)
    except OSError:
        return None
