"""The model folder's ``manifest.json``: the one schema export writes and edge and cloud read.

A typed, versioned view (``splitinfer-model/2``). Nothing outside this module touches the JSON:
export builds a :class:`Manifest` and calls :func:`write_manifest`; edge and cloud call
:func:`load_manifest` and read attributes. Folders written by 0.1 (``splitinfer-model/1``) load
through :func:`_upgrade_v1`.

Identity. ``Manifest.sha256`` is the *deployment hash* the edge sends with every request and the
server matches: the sha256 of a canonical JSON of what the two halves compute with (graph files,
tokenizer, zstd dictionary, dims, classes, preprocessing, codec, exit, selection, operating points
without their timings). Timings measured at export are left out, so exporting the same checkpoint
with the same options twice gives the same hash, and ``version`` (its first 12 hex digits) differs
whenever anything that changes an answer differs. For 0.1 folders it is the manifest file's sha256,
as 0.1 computed it.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import ManifestError
from .points import OperatingPoint

__all__ = ["MANIFEST_FORMAT", "MANIFEST_NAME", "TASKS", "INPUT_KINDS", "FileRef", "InputSpec", "TokenSpec", "ExitSpec",
           "SelectionSpec", "CodecSpec", "Guarantee", "Calibration", "Manifest", "load_manifest", "write_manifest", "sha256_file",
           "cpu_signature"]

MANIFEST_FORMAT = "splitinfer-model/2"
FORMAT_V1 = "splitinfer-model/1"
MANIFEST_NAME = "manifest.json"
TASKS = ("classification", "embedding")
INPUT_KINDS = ("image", "text")
EXIT_SCORES = ("max_softmax", "view_consistency", "none")
IMPORTANCE_KINDS = ("cls_attention", "learned")
FILE_ROLES = ("device", "server", "device_int8", "tokenizer", "zstd_dictionary")


def cpu_signature() -> dict:
    """This CPU as a manifest records it next to latency figures, and as the edge matches it:
    {"machine": e.g. "aarch64", "model": the cpuinfo model name}."""
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            fields_ = dict(line.split(":", 1) for line in f if ":" in line)
        fields_ = {k.strip(): v.strip() for k, v in fields_.items()}
        model = fields_.get("model name") or fields_.get("Model") or fields_.get("CPU part", "")
    except OSError:
        pass
    return {"machine": platform.machine(), "model": model or platform.processor()}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- sections -------------------------------------------------------------------------------------

class _Section:
    """A frozen dataclass read from and written to one JSON object, unknown keys refused."""

    @classmethod
    def from_json(cls, data: Any, where: str):
        if not isinstance(data, Mapping):
            raise ManifestError(f"manifest.json: {where} must be an object, got {type(data).__name__}")
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ManifestError(f"manifest.json: unknown field(s) {', '.join(f'{where}.{k}' for k in unknown)}")
        missing = [n for n, f in names.items() if n not in data and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ManifestError(f"manifest.json: missing field(s) {', '.join(f'{where}.{k}' for k in missing)}")
        try:
            return cls(**{k: _tuple(v) for k, v in data.items()})
        except (TypeError, ValueError) as exc:
            raise ManifestError(f"manifest.json: {where}: {exc}") from exc

    def to_json(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _tuple(value):
    return tuple(_tuple(v) for v in value) if isinstance(value, list) else value


def _plain(value):
    if isinstance(value, _Section):
        return value.to_json()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _number(name: str, value, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"{name} must be a number, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return float(value)


def _integer(name: str, value, lo: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    return value


@dataclass(frozen=True)
class FileRef(_Section):
    """A file of the model folder: its path relative to the folder and its sha256."""

    path: str
    sha256: str

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path or Path(self.path).is_absolute() or ".." in Path(self.path).parts:
            raise ValueError(f"path must be a relative path inside the model folder, got {self.path!r}")
        if not isinstance(self.sha256, str) or len(self.sha256) != 64:
            raise ValueError(f"sha256 must be 64 hex digits, got {self.sha256!r}")


@dataclass(frozen=True)
class InputSpec(_Section):
    """What the device half reads. image: ``preprocessing`` (see :mod:`splitinfer.protos.preprocessing`),
    device input ``image`` float32 (B, C, H, W). text: the ``tokenizer`` file role and ``max_length``
    tokens (CLS included), device inputs ``input_ids`` / ``attention_mask`` int64 (B, T)."""

    kind: str
    preprocessing: Mapping | None = None
    max_length: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in INPUT_KINDS:
            raise ValueError(f"kind must be one of {INPUT_KINDS}, got {self.kind!r}")
        if self.kind == "image":
            from .preprocessing import ImagePreprocessing

            if isinstance(self.preprocessing, ImagePreprocessing):
                object.__setattr__(self, "preprocessing", self.preprocessing.to_dict())
            ImagePreprocessing.load(self.preprocessing)  # validates, naming the bad field
        if self.kind == "text":
            _integer("max_length", self.max_length, 2)


@dataclass(frozen=True)
class TokenSpec(_Section):
    """Tokens at the split. dim: width on the wire (the bottleneck width when one is deployed);
    model_dim: the transformer's width; num_tokens: most tokens (CLS first, at cls_position 0);
    grid: patches per side for image models (None for text)."""

    dim: int
    model_dim: int
    num_tokens: int
    cls_position: int = 0
    grid: int | None = None

    def __post_init__(self) -> None:
        _integer("dim", self.dim, 1)
        _integer("model_dim", self.model_dim, 1)
        _integer("num_tokens", self.num_tokens, 1)
        if self.cls_position != 0:
            raise ValueError(f"cls_position must be 0, got {self.cls_position!r}")
        if self.grid is not None:
            _integer("grid", self.grid, 1)


@dataclass(frozen=True)
class ExitSpec(_Section):
    """How the device decides to answer alone: when device.onnx's exit confidence >= threshold.

    score: "max_softmax" (the exit head's top probability), "view_consistency" (device.onnx also runs
    the exit head on the image rolled by ``view_shift`` = (rows, columns) pixels; the confidence is
    the geometric mean of the answer's probability on both views, so an answer that does not survive
    a small shift is offloaded), or "none" (embedding models: the device never answers alone).
    """

    score: str
    threshold: float
    view_shift: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.score not in EXIT_SCORES:
            raise ValueError(f"score must be one of {EXIT_SCORES}, got {self.score!r}")
        _number("threshold", self.threshold, 0.0, 1.0 + 1e-6)
        if self.score == "view_consistency":
            shift = self.view_shift
            if (not isinstance(shift, tuple) or len(shift) != 2
                    or any(isinstance(v, bool) or not isinstance(v, int) for v in shift) or shift == (0, 0)):
                raise ValueError(f"view_shift must be two integers (rows, columns), not both 0, got {shift!r}")
        elif self.view_shift is not None:
            raise ValueError(f"view_shift applies only to score 'view_consistency', got {self.view_shift!r}")

    def to_json(self) -> dict:
        out = super().to_json()
        if self.view_shift is None:
            del out["view_shift"]  # folders without a second view hash as before
        return out


@dataclass(frozen=True)
class SelectionSpec(_Section):
    """The edge keeps CLS and the fewest tokens covering ``mass`` of the importance, at most ``budget``
    and at least ``min_tokens`` (see :func:`splitinfer.edge.selection.select_tokens`). importance:
    how device.onnx scores tokens ("cls_attention" or a "learned" scorer)."""

    mass: float
    budget: int
    min_tokens: int = 1
    importance: str = "cls_attention"
    method: str = "importance_mass"

    def __post_init__(self) -> None:
        _number("mass", self.mass, 1e-9, 1.0)
        _integer("budget", self.budget, 1)
        _integer("min_tokens", self.min_tokens, 1)
        if self.importance not in IMPORTANCE_KINDS:
            raise ValueError(f"importance must be one of {IMPORTANCE_KINDS}, got {self.importance!r}")
        if self.method != "importance_mass":
            raise ValueError(f"method must be 'importance_mass', got {self.method!r}")


@dataclass(frozen=True)
class CodecSpec(_Section):
    """How the edge encodes tokens (:class:`splitinfer.protos.codec.CodecConfig`); the zstd
    dictionary, when one ships, is the ``zstd_dictionary`` file role."""

    encoding: str
    compression: str
    group_size: int = 0
    scale_dtype: str = "fp32"

    def __post_init__(self) -> None:
        _integer("group_size", self.group_size, 0)
        self.config()  # the codec validates its own settings

    def config(self):
        from .codec import CodecConfig

        return CodecConfig(self.encoding, self.compression, group_size=self.group_size, scale_dtype=self.scale_dtype)


@dataclass(frozen=True)
class Guarantee(_Section):
    """What Learn-then-Test (:mod:`splitinfer.protos.calibration`) certified for the default point.

    Loss = the share of inputs the whole model answers right and the split system wrong; it bounds
    the accuracy lost against the whole model. certified: with probability >= 1 - delta over the
    draw of the n calibration inputs, the default point's loss on exchangeable inputs is <= epsilon.
    Export tests each of ``configurations`` settings (bottleneck, encoding, mass, budget) down and
    up its own threshold sequence, each at delta / (2 configurations) (Bonferroni), so the choice
    among them keeps the level. bound: the (1 - delta) Clopper-Pearson upper bound on the default
    point's loss (at that level, like the test; it may exceed epsilon when nothing was certified and
    the point is the most accurate one measured); empirical: its mean loss and p_value its p-value on the calibration split.
    reason: why nothing is certified ("" when it is); bound, empirical and p_value are None when no
    test could run (an embedding model).
    """

    epsilon: float
    delta: float
    n: int
    method: str
    configurations: int
    certified: bool
    bound: float | None
    empirical: float | None
    p_value: float | None
    reason: str = ""

    def __post_init__(self) -> None:
        for name in ("epsilon", "delta"):
            value = _number(name, getattr(self, name), 0.0, 1.0)
            if not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {value}")
        _integer("n", self.n, 1)
        _integer("configurations", self.configurations, 1)
        from .calibration import METHODS

        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not isinstance(self.certified, bool):
            raise ValueError(f"certified must be true or false, got {self.certified!r}")
        for name in ("bound", "empirical", "p_value"):
            if getattr(self, name) is not None:
                _number(name, getattr(self, name), 0.0, 1.0)
        if not isinstance(self.reason, str):
            raise ValueError(f"reason must be a string, got {self.reason!r}")
        if self.certified and (self.bound is None or self.reason):
            raise ValueError("a certified guarantee has a bound and no reason")
        if not self.certified and not self.reason:
            raise ValueError("a guarantee that is not certified must say why (reason)")

    def summary(self) -> str:
        """One line for logs and reports."""
        head = f"eps={self.epsilon:g}, delta={self.delta:g}, n={self.n}, {self.method}"
        if self.certified:
            return (f"certified: loss against the whole model <= {self.epsilon:g} with probability >= "
                    f"{1 - self.delta:g} ({head}; bound {self.bound:.4f}, calibration loss {self.empirical:.4f})")
        return f"not certified ({head}): {self.reason}"


@dataclass(frozen=True)
class Calibration(_Section):
    """Figures measured on the calibration split at export, for the default operating point.
    ``accuracy_*`` are label accuracy (classification) or mean cosine to the whole model (embedding).
    guarantee: the default point's :class:`Guarantee` (None in folders exported before it existed).
    """

    data: str
    n: int
    accuracy_full: float
    accuracy_split: float
    exit_rate: float
    mean_bytes_per_request: float
    mean_bytes_per_offload: float
    mean_tokens_per_offload: float
    max_accuracy_drop: float
    guarantee: Guarantee | None = None
    disagreement: float | None = None  # share of the inputs answered on the device where the server's answer differs

    @classmethod
    def from_json(cls, data: Any, where: str):
        if isinstance(data, Mapping) and isinstance(data.get("guarantee"), Mapping):
            data = {**data, "guarantee": Guarantee.from_json(data["guarantee"], f"{where}.guarantee")}
        return super().from_json(data, where)

    def __post_init__(self) -> None:
        _integer("n", self.n, 1)
        for name in ("accuracy_full", "accuracy_split", "exit_rate"):
            _number(name, getattr(self, name), -1.0, 1.0)
        if self.guarantee is not None and not isinstance(self.guarantee, Guarantee):
            raise ValueError(f"guarantee must be an object, got {type(self.guarantee).__name__}")
        if self.guarantee is not None and self.guarantee.n != self.n:
            raise ValueError(f"guarantee.n {self.guarantee.n} must equal n {self.n}")
        if self.disagreement is not None:
            _number("disagreement", self.disagreement, 0.0, 1.0)

    def to_json(self) -> dict:
        out = super().to_json()
        if self.disagreement is None:  # optional: manifests without it stay as they were
            del out["disagreement"]
        return out


# --- the manifest ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Manifest:
    """One model folder, parsed and validated. ``folder`` is where it was loaded from (None before
    it is written). ``info`` holds what no code reads (architecture, parity, ONNX versions, the
    device variants' latencies): it is written but never part of the deployment hash."""

    name: str
    task: str
    split: int
    input: InputSpec
    tokens: TokenSpec
    classes: tuple[str, ...]
    exit: ExitSpec
    selection: SelectionSpec
    codec: CodecSpec
    files: Mapping[str, FileRef]
    operating_points: tuple[OperatingPoint, ...]
    default_operating_point: str
    calibration: Calibration
    bottleneck: int | None = None
    device_auto_choice: str = "float"
    info: Mapping = field(default_factory=dict, repr=False)
    format: str = MANIFEST_FORMAT
    folder: Path | None = field(default=None, compare=False, repr=False)
    file_sha256: str = field(default="", compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or any(c.isspace() for c in self.name) or len(self.name) > 200:
            raise ManifestError(f"manifest.json: name must be 1-200 characters without spaces, got {self.name!r}")
        if self.task not in TASKS:
            raise ManifestError(f"manifest.json: task must be one of {TASKS}, got {self.task!r}")
        if self.task == "classification" and len(self.classes) < 2:
            raise ManifestError(f"manifest.json: a classifier needs >= 2 classes, got {list(self.classes)}")
        for role in ("device", "server"):
            if role not in self.files:
                raise ManifestError(f"manifest.json: missing field files.{role}")
        unknown = sorted(set(self.files) - set(FILE_ROLES))
        if unknown:
            raise ManifestError(f"manifest.json: unknown file role(s) {unknown}; known: {FILE_ROLES}")
        if self.exit.score == "view_consistency" and (self.input.kind != "image" or self.task != "classification"):
            raise ManifestError("manifest.json: exit.score 'view_consistency' needs an image classifier, "
                                f"this model is a {self.input.kind} {self.task} model")
        if (self.exit.score == "none") != (self.task == "embedding"):
            raise ManifestError(f"manifest.json: exit.score {self.exit.score!r} does not fit a {self.task} model")
        if self.input.kind == "text" and "tokenizer" not in self.files:
            raise ManifestError("manifest.json: a text model needs files.tokenizer")
        if self.device_auto_choice not in ("float", "int8") or (self.device_auto_choice == "int8"
                                                                and "device_int8" not in self.files):
            raise ManifestError(f"manifest.json: device_auto_choice {self.device_auto_choice!r} names no device half")
        ids = [p.id for p in self.operating_points]
        if not ids or len(set(ids)) != len(ids):
            raise ManifestError(f"manifest.json: operating point ids must be present and unique, got {ids}")
        if self.default_operating_point not in ids:
            raise ManifestError(f"manifest.json: default_operating_point {self.default_operating_point!r} "
                                f"is not in the table {ids}")
        if self.bottleneck is not None and self.bottleneck != self.tokens.dim:
            raise ManifestError(f"manifest.json: bottleneck {self.bottleneck} must equal tokens.dim {self.tokens.dim}")

    # -- identity
    @functools.cached_property
    def sha256(self) -> str:
        """The deployment hash (see the module docstring)."""
        if self.format == FORMAT_V1:
            return self.file_sha256
        return hashlib.sha256(json.dumps(self._compute_json(), sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    @property
    def version(self) -> str:
        if self.format == FORMAT_V1:
            return str(self.info.get("version", ""))
        return self.sha256[:12]

    def _compute_json(self) -> dict:
        out = self._json(with_version=False)
        for key in ("info", "calibration", "format", "device_auto_choice"):
            out.pop(key, None)
        out["operating_points"] = [p.compute_json() for p in self.operating_points]
        return out

    def _json(self, with_version: bool = True) -> dict:
        return {
            "format": MANIFEST_FORMAT, "name": self.name, **({"version": self.version} if with_version else {}),
            "task": self.task, "split": self.split, "input": self.input.to_json(), "tokens": self.tokens.to_json(),
            "classes": list(self.classes), "exit": self.exit.to_json(), "selection": self.selection.to_json(),
            "codec": self.codec.to_json(), "files": {k: v.to_json() for k, v in sorted(self.files.items())},
            "operating_points": [p.to_dict() for p in self.operating_points],
            "default_operating_point": self.default_operating_point, "calibration": self.calibration.to_json(),
            "bottleneck": self.bottleneck, "device_auto_choice": self.device_auto_choice, "info": _plain(self.info),
        }

    # -- convenient views
    @property
    def dim(self) -> int:
        return self.tokens.dim

    @property
    def num_tokens(self) -> int:
        return self.tokens.num_tokens

    @property
    def num_patches(self) -> int:
        return self.tokens.num_tokens - 1

    @property
    def output_dim(self) -> int | None:
        """K classes; None for an embedding model (the server half's width decides)."""
        return len(self.classes) if self.task == "classification" else None

    @property
    def exit_threshold(self) -> float:
        return self.exit.threshold

    @property
    def preprocessing(self):
        """The image preprocessing (:class:`~splitinfer.protos.preprocessing.ImagePreprocessing`)."""
        if self.input.kind != "image":
            raise ManifestError(f"{self.name} is a {self.input.kind} model: it has no image preprocessing")
        from .preprocessing import ImagePreprocessing

        return ImagePreprocessing.load(self.input.preprocessing)

    def path(self, role: str) -> Path:
        """The file of ``role`` (device, server, device_int8, tokenizer, zstd_dictionary) in the folder."""
        if role not in self.files:
            raise ManifestError(f"{self.folder}: the model ships no {role} file")
        return Path(self.folder or ".") / self.files[role].path

    @property
    def device_path(self) -> Path:
        return self.path("device")

    @property
    def server_path(self) -> Path:
        return self.path("server")

    def point(self, point_id: str | None = None) -> OperatingPoint:
        """The operating point ``point_id`` (None: the default one)."""
        wanted = point_id or self.default_operating_point
        for p in self.operating_points:
            if p.id == wanted:
                return p
        raise ManifestError(f"{self.name}: no operating point {wanted!r}; the table has "
                            f"{', '.join(p.id for p in self.operating_points)}")

    @property
    def zstd_dictionary(self) -> bytes | None:
        """The zstd dictionary shipped with the model, or None; read once, checked against its sha256."""
        if "zstd_dictionary" not in self.files:
            return None
        cached = self.__dict__.get("_zstd_dictionary")
        if cached is None:
            path = self.path("zstd_dictionary")
            if not path.is_file():
                raise ManifestError(f"{self.folder}: zstd dictionary {path.name} not found")
            cached = path.read_bytes()
            if hashlib.sha256(cached).hexdigest() != self.files["zstd_dictionary"].sha256:
                raise ManifestError(f"{self.folder}: {path.name} does not match the sha256 in manifest.json")
            object.__setattr__(self, "_zstd_dictionary", cached)
        return cached

    @property
    def int8_eligible(self) -> bool:
        """Export found the INT8 device half within its accuracy allowance."""
        return bool(self.info.get("device_variants", {}).get("int8", {}).get("eligible", False))

    @property
    def int8_measured_on(self) -> tuple[str, str] | None:
        """(machine, cpu model) where export timed the two device halves, or None."""
        measured = self.info.get("device_variants", {}).get("measured_on")
        return (measured.get("machine"), measured.get("model")) if isinstance(measured, Mapping) else None

    @property
    def int8_latency_ratio(self) -> float | None:
        return self.info.get("device_variants", {}).get("latency_ratio_int8_over_float")

    def verify(self, roles: tuple[str, ...]) -> None:
        """Check that the files of ``roles`` exist and match their sha256 (ManifestError otherwise)."""
        for role in roles:
            path = self.path(role)
            if not path.is_file():
                raise ManifestError(f"{self.folder}: {role} file {self.files[role].path} not found")
            if sha256_file(path) != self.files[role].sha256:
                raise ManifestError(f"{self.folder}: {self.files[role].path} does not match the sha256 in manifest.json")


def write_manifest(folder: Path, manifest: Manifest) -> Manifest:
    """Write ``folder/manifest.json`` (stable key order) and return the manifest as loaded from it."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    path.write_text(json.dumps(manifest._json(), indent=2, sort_keys=True) + "\n")
    return load_manifest(folder, verify_files=False, need=())


def _from_json(data: Mapping, where: Path) -> Manifest:
    known = {"format", "name", "version", "task", "split", "input", "tokens", "classes", "exit", "selection", "codec",
             "files", "operating_points", "default_operating_point", "calibration", "bottleneck",
             "device_auto_choice", "info"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ManifestError(f"{where}: unknown field(s) {', '.join(unknown)}")
    for key in known - {"bottleneck", "device_auto_choice", "info", "version"}:
        if key not in data:
            raise ManifestError(f"{where}: missing field {key!r}")
    files = data["files"]
    if not isinstance(files, Mapping):
        raise ManifestError(f"{where}: files must be an object")
    points = data["operating_points"]
    if not isinstance(points, list):
        raise ManifestError(f"{where}: operating_points must be a list")
    try:
        rows = tuple(OperatingPoint.from_dict(p) for p in points)
    except (TypeError, ValueError, AttributeError) as exc:
        raise ManifestError(f"{where}: bad operating point: {exc}") from exc
    classes = data["classes"]
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise ManifestError(f"{where}: classes must be a list of strings")
    split = data["split"]
    if isinstance(split, bool) or not isinstance(split, int) or split < 1:
        raise ManifestError(f"{where}: split must be an integer >= 1, got {split!r}")
    return Manifest(
        name=data["name"], task=data["task"], split=split,
        input=InputSpec.from_json(data["input"], "input"), tokens=TokenSpec.from_json(data["tokens"], "tokens"),
        classes=tuple(classes), exit=ExitSpec.from_json(data["exit"], "exit"),
        selection=SelectionSpec.from_json(data["selection"], "selection"),
        codec=CodecSpec.from_json(data["codec"], "codec"),
        files={k: FileRef.from_json(v, f"files.{k}") for k, v in files.items()},
        operating_points=rows, default_operating_point=data["default_operating_point"],
        calibration=Calibration.from_json(data["calibration"], "calibration"),
        bottleneck=data.get("bottleneck"), device_auto_choice=data.get("device_auto_choice", "float"),
        info=data.get("info") or {},
    )


def load_manifest(folder: Path, verify_files: bool = True, need: tuple[str, ...] = ("device", "server")) -> Manifest:
    """Read and validate ``folder/manifest.json``; with ``verify_files`` check the sha256 of the
    files of ``need`` (the edge needs "device", a server "server") and of the tokenizer and zstd
    dictionary when the model has them. Raises ManifestError naming what is wrong."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{folder} is not a model folder: {MANIFEST_NAME} not found")
    raw = path.read_bytes()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: must hold a JSON object")
    fmt = data.get("format")
    if fmt == FORMAT_V1:
        from ._manifest_v1 import upgrade_v1

        manifest = dataclasses.replace(_from_json(upgrade_v1(data, path), path), format=FORMAT_V1)
    elif fmt == MANIFEST_FORMAT:
        manifest = _from_json(data, path)
    else:
        raise ManifestError(f"{path}: format must be {MANIFEST_FORMAT!r} (or {FORMAT_V1!r}), got {fmt!r}")
    manifest = dataclasses.replace(manifest, folder=folder, file_sha256=hashlib.sha256(raw).hexdigest())
    stored = data.get("version")
    if fmt == MANIFEST_FORMAT and stored not in (None, manifest.version):
        raise ManifestError(f"{path}: version {stored!r} does not match its contents ({manifest.version}): "
                            "the manifest was edited after export")
    roles = tuple(dict.fromkeys([*need, *(r for r in ("tokenizer", "zstd_dictionary") if r in manifest.files)]))
    for role in roles:
        if role not in manifest.files:
            raise ManifestError(f"{folder}: manifest.json names no {role} file")
    if verify_files:
        manifest.verify(roles)
    else:
        for role in need:
            if not manifest.path(role).is_file():
                raise ManifestError(f"{folder}: {role} file {manifest.files[role].path} not found")
    return manifest
