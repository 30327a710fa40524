"""Input that once escaped as UNKNOWN, INTERNAL or a misleading error: each now gets its own clear status.

Undecodable bytes, oversized echoed strings, quantisation scales that overflow after dequantization,
and unreadable TLS files.
"""
from __future__ import annotations

import logging
from pathlib import Path

import grpc
import numpy as np
import pytest

from splitinfer.cloud import SERVICE_NAME
from splitinfer.cloud.cli import main
from splitinfer.protos import CodecConfig
from splitinfer.protos import splitinfer_pb2 as pb
from splitinfer.protos.errors import MAX_DETAILS_CHARS

from .conftest import RPC_TIMEOUT_S

INFER = f"/{SERVICE_NAME}/Infer"
UNKNOWN_MODEL = "<unknown>"


def _raw_infer(channel: grpc.Channel):
    """Infer taking and returning bytes, so the client can send anything."""
    return channel.unary_unary(INFER, request_serializer=None, response_deserializer=None)


def _requests_counted(server, model: str, code: str) -> float:
    value = server.metrics.registry.get_sample_value("splitinfer_requests_total", {"model": model, "code": code})
    return value or 0.0


def _error(call, payload, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(payload, timeout=RPC_TIMEOUT_S, **kwargs)
    return info.value


def _assert_serves(stub, make_request) -> None:
    response = stub.Infer(make_request(seed=3), timeout=RPC_TIMEOUT_S)
    assert sum(response.probabilities) == pytest.approx(1.0, abs=1e-5)


UNDECODABLE = {
    "one_ff_byte": b"\xff",
    "truncated_length": b"\x0a\x40abc",  # field 1 says 64 bytes follow, 3 do
    "invalid_utf8_model": b"\x0a\x02\xc3\x28",  # proto3 strings must be UTF-8
    "packet_past_the_end": b"\x22\x05\x08",  # packet (field 4) says 5 bytes, 1 follows
    "bad_nested_packet": b"\x22\x03\x08\xff\xff",  # a TokenPacket with a truncated varint
    "group_end_tag": b"\x0c",
}


def test_undecodable_bytes_are_invalid_argument_counted_without_traceback(live_server, channel, stub, make_request,
                                                                          caplog) -> None:
    call = _raw_infer(channel)
    before = _requests_counted(live_server, UNKNOWN_MODEL, "INVALID_ARGUMENT")
    with caplog.at_level(logging.INFO):
        for name, payload in UNDECODABLE.items():
            error = _error(call, payload)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, error.code(), error.details())
            assert "not a valid splitinfer.v1.InferRequest" in error.details()
            assert len(error.details()) <= MAX_DETAILS_CHARS
    assert _requests_counted(live_server, UNKNOWN_MODEL, "INVALID_ARGUMENT") - before == len(UNDECODABLE)
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged for a bad request"
    assert "Traceback" not in caplog.text
    refused = [r for r in caplog.records if r.getMessage().startswith("Infer refused: INVALID_ARGUMENT")]
    assert len(refused) == len(UNDECODABLE)  # one line each
    assert max(len(r.getMessage()) for r in refused) < 300
    _assert_serves(stub, make_request)


def test_valid_bytes_through_the_raw_method_are_answered(channel, make_request) -> None:
    """The custom deserializer is the real one: a valid request's bytes are parsed and served."""
    answer = pb.InferResponse.FromString(_raw_infer(channel)(make_request(seed=4).SerializeToString(),
                                                             timeout=RPC_TIMEOUT_S))
    assert answer.request_id == "req-4" and sum(answer.probabilities) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("field, code, tail", [
    ("model", grpc.StatusCode.NOT_FOUND, "served models: tiny"),
    ("manifest_sha256", grpc.StatusCode.FAILED_PRECONDITION, "on the edge and the server"),
    ("request_id", grpc.StatusCode.INVALID_ARGUMENT, "at most 128 allowed"),
])
def test_long_strings_get_bounded_details(stub, make_request, field: str, code, tail: str) -> None:
    """A 20 KB name once came back as the whole name, past gRPC's metadata limit (RESOURCE_EXHAUSTED)."""
    request = make_request(**{field: "\u00e9" + "m" * 20_000})
    error = _error(stub.Infer, request)
    assert error.code() == code, error.details()
    assert len(error.details()) <= MAX_DETAILS_CHARS
    assert error.details().endswith(tail)  # the end, which says what to do, is kept
    _assert_serves(stub, make_request)


def _with_scales(packet: pb.TokenPacket, scale: float) -> None:
    dtype = "<f2" if packet.scales_encoding == pb.ENCODING_FP16 else "<f4"
    count = len(packet.scales) // np.dtype(dtype).itemsize
    packet.scales = np.full(count, scale, dtype=dtype).tobytes()


@pytest.mark.parametrize("encoding, scale", [("int8", 3e38), ("int4", 3e38), ("int8", 1e30), ("int4", 1e12)])
def test_huge_finite_scales_are_invalid_argument(stub, make_request, encoding: str, scale: float) -> None:
    """Finite scales whose dequantized tokens overflow the server half once came back INTERNAL."""
    request = make_request(count=6, config=CodecConfig(encoding, "zstd"))
    _with_scales(request.packet, scale)
    error = _error(stub.Infer, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "after dequantization" in error.details()
    _assert_serves(stub, make_request)


def test_huge_fp32_values_are_invalid_argument(stub, make_request) -> None:
    request = make_request(count=4)
    values = np.frombuffer(request.packet.payload, "<f4").copy()
    values[5] = 1e30
    request.packet.payload = values.tobytes()
    error = _error(stub.Infer, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "out of range" in error.details()


# --- TLS files: a bad one is named as such, exit 2 ---------------------------------------------------

@pytest.fixture
def garbage(tmp_path: Path) -> Path:
    path = tmp_path / "garbage.pem"
    path.write_bytes(b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n")
    return path


@pytest.mark.parametrize("broken, message", [
    ("cert", "TLS certificate file"),
    ("key", "TLS key file"),
    ("client_ca", "TLS client CA file"),
    ("mismatch", "does not match the certificate"),
])
def test_bad_tls_file_is_named_and_exits_2(tiny_model_dir: Path, certificates, garbage: Path, capsys,
                                           broken: str, message: str) -> None:
    cert, key, ca = certificates.server_cert, certificates.server_key, certificates.ca
    if broken == "cert":
        cert = garbage
    elif broken == "key":
        key = garbage
    elif broken == "client_ca":
        ca = garbage
    else:
        key = certificates.client_key  # a real key, of another certificate
    args = ["--model", str(tiny_model_dir), "--port", "0", "--tls-cert", str(cert), "--tls-key", str(key),
            "--tls-client-ca", str(ca)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Failed to bind" not in err and "cannot listen" not in err
    named = {"cert": cert, "key": key, "client_ca": ca, "mismatch": key}[broken]
    assert str(named) in err
