"""The exported config.pbtxt read by Triton's own ModelConfig protobuf (tritonclient), checked against server.onnx."""
from __future__ import annotations

from pathlib import Path

import pytest

from splitinfer.protos import load_manifest

pytest.importorskip("onnx")
model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
from google.protobuf import text_format  # noqa: E402

from splitinfer.export.triton import TritonOptions, write_triton_repository  # noqa: E402

# onnxruntime's tensor type names -> Triton's DataType enum names
_ORT_TO_TRITON = {"tensor(float)": "TYPE_FP32", "tensor(bool)": "TYPE_BOOL", "tensor(float16)": "TYPE_FP16",
                  "tensor(int64)": "TYPE_INT64", "tensor(int32)": "TYPE_INT32"}


def _parse(folder: Path):
    config = model_config_pb2.ModelConfig()
    text_format.Parse((folder / "config.pbtxt").read_text(), config)  # raises ParseError on any unknown field
    return config


def _signature(tensors) -> dict[str, tuple[str, list[int]]]:
    """ORT inputs/outputs -> {name: (Triton type, dims without the batch axis, -1 = dynamic)}."""
    return {t.name: (_ORT_TO_TRITON[t.type], [d if isinstance(d, int) else -1 for d in t.shape[1:]]) for t in tensors}


@pytest.mark.parametrize("provider, kind, accelerator", [("cpu", "KIND_CPU", None), ("cuda", "KIND_GPU", None),
                                                         ("tensorrt", "KIND_GPU", "tensorrt"),
                                                         ("openvino", "KIND_CPU", "openvino")])
def test_config_parses_as_tritons_model_config_and_matches_server_onnx(tiny_model_dir: Path, tmp_path: Path,
                                                                       provider, kind, accelerator) -> None:
    import onnxruntime as ort

    manifest = load_manifest(tiny_model_dir)
    options = TritonOptions(max_batch_size=8, max_queue_delay_us=200, instances=2, provider=provider)
    folder = write_triton_repository(tiny_model_dir, tmp_path / "triton", options)
    config = _parse(folder)
    pb = model_config_pb2

    assert config.name == manifest.name and config.backend == "onnxruntime"
    assert config.max_batch_size == 8
    session = ort.InferenceSession(str(folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    declared_in = {t.name: (pb.DataType.Name(t.data_type), list(t.dims)) for t in config.input}
    declared_out = {t.name: (pb.DataType.Name(t.data_type), list(t.dims)) for t in config.output}
    assert declared_in == _signature(session.get_inputs())
    assert declared_out == _signature(session.get_outputs())
    assert declared_in == {"tokens": ("TYPE_FP32", [-1, manifest.dim]), "mask": ("TYPE_BOOL", [-1])}
    assert declared_out == {"logits": ("TYPE_FP32", [len(manifest.classes)])}

    (group,) = config.instance_group
    assert pb.ModelInstanceGroup.Kind.Name(group.kind) == kind and group.count == 2
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    assert config.dynamic_batching.max_queue_delay_microseconds == 200
    assert config.version_policy.latest.num_versions == 1
    assert config.parameters["splitinfer_manifest_sha256"].string_value == manifest.sha256
    accelerators = config.optimization.execution_accelerators
    named = [a.name for a in (*accelerators.gpu_execution_accelerator, *accelerators.cpu_execution_accelerator)]
    assert named == ([accelerator] if accelerator else [])
    if accelerator:
        slot = accelerators.gpu_execution_accelerator if kind == "KIND_GPU" else accelerators.cpu_execution_accelerator
        assert [a.name for a in slot] == [accelerator]


def test_a_provider_triton_cannot_place_is_refused() -> None:
    with pytest.raises(ValueError, match="provider must be one of"):
        TritonOptions(provider="rocm")
