"""The server half as a Triton Inference Server model repository, for deployments that outgrow one box.

    write_triton_repository("artifacts/model", "triton_repo")
    # triton_repo/
    #   vit-cluttered-mnist/
    #     config.pbtxt      backend onnxruntime, dynamic batching, inputs tokens (-1, d) + mask (-1), output logits (K)
    #     manifest.json     the export's manifest (its sha256 is also a config parameter)
    #     1/model.onnx      server.onnx, byte for byte

Triton's dynamic batcher only batches requests whose shapes agree, so a client that wants batching
there pads its token set to a fixed count (``mask`` False on the padding, which the graph ignores);
splitinfer's own server batches ragged token sets as they come.
"""
from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import onnx

from splitinfer.protos import load_manifest

__all__ = ["TRITON_PROVIDERS", "TritonOptions", "triton_config", "write_triton_repository"]

logger = logging.getLogger(__name__)

# ONNX tensor element types -> Triton data types
_TRITON_TYPES = {
    onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16", onnx.TensorProto.DOUBLE: "TYPE_FP64",
    onnx.TensorProto.BOOL: "TYPE_BOOL", onnx.TensorProto.INT8: "TYPE_INT8", onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.INT32: "TYPE_INT32", onnx.TensorProto.INT64: "TYPE_INT64",
}
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
# provider -> (instance kind, execution accelerator of Triton's onnxruntime backend or None)
TRITON_PROVIDERS = {"cpu": ("KIND_CPU", None), "openvino": ("KIND_CPU", "openvino"), "cuda": ("KIND_GPU", None),
                    "tensorrt": ("KIND_GPU", "tensorrt")}


@dataclass(frozen=True)
class TritonOptions:
    """max_batch_size: Triton's batch limit. max_queue_delay_us: how long Triton holds a request to
    fill a batch. instances: model instances (per GPU for a GPU provider). version: the Triton
    version folder (an integer). provider: where Triton's ONNX Runtime backend runs the model, as
    ``splitinfer-serve --provider`` names it: "cpu" (KIND_CPU), "openvino" (KIND_CPU with the
    OpenVINO accelerator), "cuda" (KIND_GPU) or "tensorrt" (KIND_GPU with the TensorRT accelerator)."""

    max_batch_size: int = 16
    max_queue_delay_us: int = 500
    instances: int = 1
    version: int = 1
    provider: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "instances", "version"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue_delay_us < 0:
            raise ValueError(f"max_queue_delay_us must be >= 0, got {self.max_queue_delay_us}")
        if self.provider not in TRITON_PROVIDERS:
            raise ValueError(f"provider must be one of {sorted(TRITON_PROVIDERS)} for Triton, got {self.provider!r}")

    @property
    def kind(self) -> str:
        """Triton's instance kind: KIND_GPU for CUDA and TensorRT, else KIND_CPU."""
        return TRITON_PROVIDERS[self.provider][0]


def _signature(values) -> list[tuple[str, str, list[int]]]:
    """(name, Triton type, dims without the batch axis; -1 = dynamic) for each graph input or output."""
    out = []
    for value in values:
        tensor = value.type.tensor_type
        if tensor.elem_type not in _TRITON_TYPES:
            raise ValueError(f"{value.name}: ONNX element type {tensor.elem_type} has no Triton equivalent")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        if not dims:
            raise ValueError(f"{value.name}: needs a batch axis")
        out.append((value.name, _TRITON_TYPES[tensor.elem_type], dims[1:]))
    return out


def triton_config(model_path: Path, name: str, sha256: str, options: TritonOptions = TritonOptions()) -> str:
    """The config.pbtxt text for ``model_path`` (an ONNX server half whose first axis is the batch)."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    inputs = _signature([v for v in graph.input if v.name not in initializers])
    outputs = _signature(graph.output)

    def tensors(kind: str, entries) -> str:
        body = ",\n".join(f'  {{\n    name: "{n}"\n    data_type: {t}\n    dims: [ {", ".join(map(str, d))} ]\n  }}'
                          for n, t, d in entries)
        return f"{kind} [\n{body}\n]"

    preferred = sorted({b for b in (4, 8, options.max_batch_size) if b <= options.max_batch_size})
    return "\n".join([
        f'name: "{name}"',
        'backend: "onnxruntime"',
        f"max_batch_size: {options.max_batch_size}",
        tensors("input", inputs),
        tensors("output", outputs),
        "dynamic_batching {",
        f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]",
        f"  max_queue_delay_microseconds: {options.max_queue_delay_us}",
        "}",
        f"instance_group [\n  {{\n    count: {options.instances}\n    kind: {options.kind}\n  }}\n]",
        *_accelerator(options),
        "version_policy: { latest: { num_versions: 1 } }",
        'parameters: {\n  key: "splitinfer_manifest_sha256"\n  value: { string_value: "' + sha256 + '" }\n}',
        "",
    ])


def _accelerator(options: TritonOptions) -> list[str]:
    """The ``optimization`` block that turns on TensorRT (GPU) or OpenVINO (CPU) in the onnxruntime backend."""
    kind, accelerator = TRITON_PROVIDERS[options.provider]
    if accelerator is None:
        return []
    slot = "gpu_execution_accelerator" if kind == "KIND_GPU" else "cpu_execution_accelerator"
    return ["optimization {", "  execution_accelerators {", f'    {slot}: [ {{ name: "{accelerator}" }} ]',
            "  }", "}"]


def write_triton_repository(model_dir: str | Path, repository: str | Path,
                            options: TritonOptions = TritonOptions()) -> Path:
    """Add the server half of ``model_dir`` to the Triton repository ``repository``; returns the model folder.

    The ONNX file is copied unchanged and the config is checked against it (inputs, types, dims).
    Raises ManifestError for a bad model folder, ValueError for a graph Triton cannot describe.
    """
    manifest = load_manifest(Path(model_dir), need=("server",))
    if not _NAME.match(manifest.name):
        raise ValueError(f"model name {manifest.name!r} is not a valid Triton model name ([A-Za-z0-9_.-]+)")
    folder = Path(repository) / manifest.name
    version_dir = folder / str(options.version)
    version_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(manifest.server_path, version_dir / "model.onnx")
    shutil.copyfile(manifest.folder / "manifest.json", folder / "manifest.json")
    config = triton_config(version_dir / "model.onnx", manifest.name, manifest.sha256, options)
    (folder / "config.pbtxt").write_text(config)
    logger.info("wrote Triton model %s version %d to %s", manifest.name, options.version, folder)
    return folder
