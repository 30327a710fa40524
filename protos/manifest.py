"""The model folder's ``manifest.json``: what export writes and what edge and cloud read.

The sha256 of the manifest *file bytes* identifies a deployment: the edge sends it with every
request and the server refuses a mismatch. The manifest in turn holds the sha256 of each half, so
a swapped ONNX file is caught at load time.
"""
from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ManifestError

__all__ = ["MANIFEST_FORMAT", "Manifest", "load_manifest", "sha256_file", "write_manifest", "cpu_signature"]

MANIFEST_FORMAT = "splitinfer-model/1"
MANIFEST_NAME = "manifest.json"


def cpu_signature() -> dict:
    """This CPU as a manifest records it next to latency figures, and as the edge matches it:
    {"machine": e.g. "aarch64", "model": the cpuinfo model name}."""
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        model = fields.get("model name") or fields.get("Model") or fields.get("CPU part", "")
    except OSError:
        pass
    return {"machine": platform.machine(), "model": model or platform.processor()}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Manifest:
    """Parsed, validated manifest. ``data`` holds the full JSON for fields not modelled here."""

    folder: Path
    sha256: str
    name: str
    version: str
    dim: int
    num_tokens: int  # full sequence length at the split: 1 (CLS) + patches
    classes: tuple[str, ...]
    exit_threshold: float
    selection_mass: float
    selection_budget: int
    encoding: str
    compression: str
    preprocessing: dict = field(repr=False)
    data: dict = field(repr=False)

    @property
    def device_path(self) -> Path:
        return self.folder / self.data["files"]["device"]["path"]

    @property
    def server_path(self) -> Path:
        return self.folder / self.data["files"]["server"]["path"]

    @property
    def num_patches(self) -> int:
        return self.num_tokens - 1

    @property
    def zstd_dictionary(self) -> bytes | None:
        """The zstd dictionary shipped with the model (``codec.zstd_dictionary``), or None.

        Read on first use and checked against its sha256; a mismatch raises ManifestError.
        """
        entry = self.data.get("codec", {}).get("zstd_dictionary")
        if not entry:
            return None
        cached = self.__dict__.get("_zstd_dictionary")
        if cached is None:
            path = self.folder / entry["path"]
            if not path.is_file():
                raise ManifestError(f"{self.folder}: zstd dictionary {entry['path']} not found")
            cached = path.read_bytes()
            if hashlib.sha256(cached).hexdigest() != entry.get("sha256"):
                raise ManifestError(f"{self.folder}: {entry['path']} does not match the sha256 in manifest.json")
            object.__setattr__(self, "_zstd_dictionary", cached)
        return cached


def write_manifest(folder: Path, data: dict) -> str:
    """Write ``manifest.json`` (stable key order) and return its sha256."""
    data = {"format": MANIFEST_FORMAT, **data}
    path = Path(folder) / MANIFEST_NAME
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return sha256_file(path)


def _get(data: dict, dotted: str, kind: type | tuple[type, ...]):
    node = data
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            raise ManifestError(f"manifest.json: missing field {dotted!r}")
        node = node[key]
    if not isinstance(node, kind) or isinstance(node, bool) and kind is not bool:
        raise ManifestError(f"manifest.json: field {dotted!r} has the wrong type ({type(node).__name__})")
    return node


def load_manifest(folder: Path, verify_files: bool = True, need: tuple[str, ...] = ("device", "server")) -> Manifest:
    """Read and validate ``folder/manifest.json``; with ``verify_files`` check the halves' sha256.

    ``need`` names the halves that must be present (the edge needs only "device", a server only
    "server").
    """
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{folder} is not a model folder: {MANIFEST_NAME} not found")
    raw = path.read_bytes()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise ManifestError(f"{path}: format must be {MANIFEST_FORMAT!r}, got {data.get('format') if isinstance(data, dict) else data!r}")
    for half in need:
        rel = _get(data, f"files.{half}.path", str)
        expected = _get(data, f"files.{half}.sha256", str)
        target = folder / rel
        if not target.is_file():
            raise ManifestError(f"{folder}: {half} half {rel} not found")
        if verify_files and sha256_file(target) != expected:
            raise ManifestError(f"{folder}: {rel} does not match the sha256 in manifest.json")
    classes = tuple(_get(data, "classes", list))
    threshold = float(_get(data, "exit.threshold", (int, float)))
    if not 0.0 <= threshold <= 1.0 + 1e-9:
        raise ManifestError(f"{path}: exit.threshold must be in [0, 1], got {threshold}")
    return Manifest(
        folder=folder,
        sha256=hashlib.sha256(raw).hexdigest(),
        name=_get(data, "name", str),
        version=str(_get(data, "version", (str, int))),
        dim=_get(data, "tokens.dim", int),
        num_tokens=_get(data, "tokens.num_tokens", int),
        classes=classes,
        exit_threshold=threshold,
        selection_mass=float(_get(data, "selection.mass", (int, float))),
        selection_budget=_get(data, "selection.budget", int),
        encoding=_get(data, "codec.encoding", str),
        compression=_get(data, "codec.compression", str),
        preprocessing=_get(data, "preprocessing", dict),
        data=data,
    )
