"""The gRPC server on loopback port 0: status codes, resilience to bad packets, health, routing."""
from __future__ import annotations

import io
import threading
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
import zstandard
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitinfer.cloud import SERVICE_NAME, ModelRegistry, create_server
from splitinfer.protos import (
    CodecConfig,
    InvalidPacket,
    ManifestMismatch,
    ModelNotFound,
    from_rpc_error,
    splitinfer_pb2_grpc,
)
from splitinfer.protos import splitinfer_pb2 as pb

from .conftest import RPC_TIMEOUT_S, SERVER_MESSAGE_LIMIT, copy_model

FP32 = CodecConfig("fp32", "none")
INT8_ZSTD = CodecConfig("int8", "zstd")
FP32_ZSTD = CodecConfig("fp32", "zstd")


def _call_code(stub, request: pb.InferRequest) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        stub.Infer(request, timeout=RPC_TIMEOUT_S)
    return info.value.code()


def _assert_serves(stub, make_request) -> pb.InferResponse:
    request = make_request(seed=11)
    response = stub.Infer(request, timeout=RPC_TIMEOUT_S)
    assert response.request_id == request.request_id
    assert sum(response.probabilities) == pytest.approx(1.0, abs=1e-5)
    return response


def test_valid_request(stub, make_request, tiny_manifest) -> None:
    request = make_request(count=7, config=INT8_ZSTD, seed=5)
    response = stub.Infer(request, timeout=RPC_TIMEOUT_S)
    probs = np.asarray(response.probabilities)
    assert probs.shape == (len(tiny_manifest.classes),)
    assert probs.sum() == pytest.approx(1.0, abs=1e-5)
    assert response.label == int(np.argmax(probs))
    assert response.request_id == "req-5"
    assert response.model_version == tiny_manifest.version
    assert response.timings.total_ms > 0


# --- malformed packets: each answered INVALID_ARGUMENT, and the server keeps serving ----------------

def _zstd_declaring(size: int) -> bytes:
    """A zstd frame whose header declares ``size`` content bytes, holding only 1 KiB."""
    out = io.BytesIO()
    writer = zstandard.ZstdCompressor(write_content_size=True).stream_writer(out, size=size, closefd=False)
    writer.write(b"\0" * 1024)
    writer.flush(zstandard.FLUSH_BLOCK)
    return out.getvalue()


def _set_positions(packet: pb.TokenPacket, positions) -> None:
    del packet.positions[:]
    packet.positions.extend(int(p) for p in positions)


def _with_value(packet: pb.TokenPacket, value: float, dtype: str) -> None:
    values = np.frombuffer(packet.payload, dtype=dtype).copy()
    values[3] = value
    packet.payload = values.tobytes()


# name -> (codec the valid packet starts from, change that breaks it: (packet, manifest) -> None)
MALFORMED_PACKETS = {
    "unknown_encoding": (FP32, lambda p, m: setattr(p, "encoding", 99)),
    "unknown_compression": (FP32, lambda p, m: setattr(p, "compression", 7)),
    "zero_tokens": (FP32, lambda p, m: setattr(p, "num_tokens", 0)),
    "too_many_tokens": (FP32, lambda p, m: setattr(p, "num_tokens", m.num_tokens + 1)),
    "wrong_dim": (FP32, lambda p, m: setattr(p, "dim", m.dim + 1)),
    "positions_count_mismatch": (FP32, lambda p, m: p.positions.pop()),
    "duplicate_positions": (FP32, lambda p, m: _set_positions(p, [0, 3, 3, 5, 6])),
    "unsorted_positions": (FP32, lambda p, m: _set_positions(p, [0, 5, 3, 6, 7])),
    "position_out_of_range": (FP32, lambda p, m: _set_positions(p, [0, 1, 2, 3, m.num_tokens])),
    "missing_cls": (FP32, lambda p, m: _set_positions(p, [1, 2, 3, 4, 5])),
    "uncompressed_size_mismatch": (FP32, lambda p, m: setattr(p, "uncompressed_size", p.uncompressed_size + 4)),
    "payload_length_mismatch": (FP32, lambda p, m: setattr(p, "payload", p.payload[:-4])),
    "payload_too_long": (FP32, lambda p, m: setattr(p, "payload", p.payload + b"\0" * 4)),
    "wrong_scales_length": (INT8_ZSTD, lambda p, m: setattr(p, "scales", p.scales[:-4])),
    "scales_on_fp32": (FP32, lambda p, m: setattr(p, "scales", b"\0" * 4 * p.num_tokens)),
    "negative_int8_scale": (CodecConfig("int8", "none"),
                            lambda p, m: setattr(p, "scales", np.full(p.num_tokens, -1, "<f4").tobytes())),
    "nan_fp32": (FP32, lambda p, m: _with_value(p, np.nan, "<f4")),
    "inf_fp16": (CodecConfig("fp16", "none"), lambda p, m: _with_value(p, np.inf, "<f2")),
    "garbage_zstd": (FP32_ZSTD, lambda p, m: setattr(p, "payload", b"definitely not a zstd frame" * 4)),
    "truncated_zstd": (FP32_ZSTD, lambda p, m: setattr(p, "payload", p.payload[:-3])),
    "zstd_bomb_declared": (FP32_ZSTD, lambda p, m: setattr(p, "payload", _zstd_declaring(1 << 40))),
    "zstd_bomb_undeclared": (FP32_ZSTD, lambda p, m: setattr(p, "payload", zstandard.ZstdCompressor(
        write_content_size=False).compress(b"\0" * (64 * p.uncompressed_size)))),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED_PACKETS))
def test_malformed_packet_is_invalid_argument(stub, make_request, tiny_manifest, kind: str) -> None:
    config, corrupt = MALFORMED_PACKETS[kind]
    request = make_request(count=5, config=config)
    corrupt(request.packet, tiny_manifest)
    assert _call_code(stub, request) == grpc.StatusCode.INVALID_ARGUMENT
    _assert_serves(stub, make_request)


@pytest.mark.parametrize("kind", ["missing_packet", "request_id_too_long", "empty_model"])
def test_malformed_request_is_invalid_argument(stub, make_request, kind: str) -> None:
    request = make_request()
    if kind == "missing_packet":
        request.ClearField("packet")
    elif kind == "request_id_too_long":
        request.request_id = "x" * 129
    else:
        request.model = ""
    assert _call_code(stub, request) == grpc.StatusCode.INVALID_ARGUMENT
    _assert_serves(stub, make_request)


# --- other status codes -----------------------------------------------------------------------------

def test_codes_map_back_to_the_same_exceptions(stub, make_request) -> None:
    cases = [
        (make_request(manifest_sha256="0" * 64), grpc.StatusCode.FAILED_PRECONDITION, ManifestMismatch),
        (make_request(model="no-such-model"), grpc.StatusCode.NOT_FOUND, ModelNotFound),
        (make_request(request_id="y" * 200), grpc.StatusCode.INVALID_ARGUMENT, InvalidPacket),
    ]
    for request, code, exc_type in cases:
        with pytest.raises(grpc.RpcError) as info:
            stub.Infer(request, timeout=RPC_TIMEOUT_S)
        assert info.value.code() == code
        assert isinstance(from_rpc_error(info.value), exc_type)


def test_sha_mismatch_says_why(stub, make_request) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.Infer(make_request(manifest_sha256="ab" * 32), timeout=RPC_TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "differs from the served version" in info.value.details()


def test_message_over_the_limit_is_resource_exhausted(stub, make_request) -> None:
    request = make_request()
    request.packet.payload = b"\0" * (SERVER_MESSAGE_LIMIT + 1)
    assert _call_code(stub, request) == grpc.StatusCode.RESOURCE_EXHAUSTED
    _assert_serves(stub, make_request)


def test_concurrent_requests(stub, make_request) -> None:
    requests = [make_request(count=2 + i % 6, seed=i) for i in range(24)]
    with futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda r: stub.Infer(r, timeout=RPC_TIMEOUT_S), requests))
    assert [r.request_id for r in responses] == [r.request_id for r in requests]


class _Lookup:
    """A registry stand-in: ``fail`` raises an unexpected error, ``block`` waits for ``release``."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        self.names = registry.names
        self.entered = threading.Event()
        self.release = threading.Event()

    def get(self, name: str, manifest_sha256: str):
        if name == "fail":
            raise RuntimeError("a bug in the server")
        if name == "block":
            self.entered.set()
            self.release.wait(RPC_TIMEOUT_S)
            raise KeyError("released")
        return self.registry.get(name, manifest_sha256)


def test_unexpected_error_is_internal_and_server_survives(tiny_registry, make_request, caplog) -> None:
    server, port = create_server(_Lookup(tiny_registry), port=0)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = splitinfer_pb2_grpc.SplitInferenceStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.Infer(make_request(model="fail"), timeout=RPC_TIMEOUT_S)
            assert info.value.code() == grpc.StatusCode.INTERNAL
            assert "a bug in the server" not in info.value.details()
            _assert_serves(stub, make_request)
    finally:
        server.stop(0).wait()
    assert "RuntimeError: a bug in the server" in caplog.text  # logged with its traceback


def test_calls_beyond_the_concurrency_limit_are_resource_exhausted(blocking_registry, make_request) -> None:
    registry, session = blocking_registry
    server, port = create_server(registry, port=0, max_concurrent_rpcs=1)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = splitinfer_pb2_grpc.SplitInferenceStub(channel)
            session.block.set()
            blocked = stub.Infer.future(make_request(), timeout=RPC_TIMEOUT_S)
            assert session.entered.wait(RPC_TIMEOUT_S)
            assert _call_code(stub, make_request()) == grpc.StatusCode.RESOURCE_EXHAUSTED
            session.block.clear()
            session.release.set()
            assert blocked.result().request_id == "req-0"
            _assert_serves(stub, make_request)
    finally:
        session.release.set()
        server.stop(0).wait()


def test_port_in_use_is_an_os_error(tiny_registry, live_server) -> None:
    with pytest.raises(OSError, match="cannot listen"):
        create_server(tiny_registry, port=live_server.port)


@pytest.mark.parametrize("setting", [{"port": -1}, {"max_workers": 0}, {"max_message_bytes": 10},
                                     {"max_concurrent_rpcs": 0}])
def test_bad_server_settings(tiny_registry, setting) -> None:
    with pytest.raises(ValueError):
        create_server(tiny_registry, **setting)


# --- health -----------------------------------------------------------------------------------------

def _health(channel: grpc.Channel, service: str) -> int:
    request = health_pb2.HealthCheckRequest(service=service)
    return health_pb2_grpc.HealthStub(channel).Check(request, timeout=RPC_TIMEOUT_S).status


def test_health_is_serving(channel, tiny_manifest) -> None:
    for service in ("", tiny_manifest.name, SERVICE_NAME):
        assert _health(channel, service) == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as info:
        _health(channel, "no-such-model")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_turns_not_serving_when_the_server_drains(tiny_registry, tiny_manifest) -> None:
    server, port = create_server(tiny_registry, port=0)
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=tiny_manifest.name),
                                                          timeout=RPC_TIMEOUT_S)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        stopped = server.stop(1.0)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert stopped.wait(RPC_TIMEOUT_S)


# --- several models ---------------------------------------------------------------------------------

def test_two_models_are_routed_by_name(tiny_model_dir: Path, tmp_path: Path, make_request, tiny_manifest) -> None:
    other_dir = copy_model(tiny_model_dir, tmp_path / "other", name="tiny-b")
    registry = ModelRegistry.from_folders([tiny_model_dir, other_dir])
    other_sha = next(m.manifest.sha256 for m in registry if m.name == "tiny-b")
    assert registry.names == ("tiny", "tiny-b") and other_sha != tiny_manifest.sha256
    server, port = create_server(registry, port=0)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = splitinfer_pb2_grpc.SplitInferenceStub(channel)
            first = stub.Infer(make_request(seed=2), timeout=RPC_TIMEOUT_S)
            second = stub.Infer(make_request(seed=2, model="tiny-b", manifest_sha256=other_sha), timeout=RPC_TIMEOUT_S)
            assert (first.model_version, second.model_version) == (tiny_manifest.version, other_sha[:12])
            np.testing.assert_allclose(first.probabilities, second.probabilities, rtol=1e-6)  # same weights
            assert _call_code(stub, make_request(model="tiny-b")) == grpc.StatusCode.FAILED_PRECONDITION
            for service in ("", "tiny", "tiny-b"):
                assert _health(channel, service) == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(0).wait()
