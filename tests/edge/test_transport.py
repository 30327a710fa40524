from __future__ import annotations

import socket
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest

from splitinfer.edge.runner import EdgeRunner
from splitinfer.edge.transport import GrpcTransport, Transport, channel_target, split_targets
from splitinfer.protos import DEFAULT_MAX_MESSAGE_BYTES
from splitinfer.protos import splitinfer_pb2 as pb
from splitinfer.protos import splitinfer_pb2_grpc
from splitinfer.protos.errors import DeadlineExceeded, InvalidPacket, ServerUnavailable


class Servicer(splitinfer_pb2_grpc.SplitInferenceServicer):
    """Answers label 7 over 10 classes; ``fail_with`` holds status codes to abort with, in order."""

    def __init__(self) -> None:
        self.fail_with: list[grpc.StatusCode] = []
        self.calls = 0
        self.release = threading.Event()
        self.stall = False

    def Infer(self, request, context):
        self.calls += 1
        if self.stall:
            self.release.wait(5)
        if self.fail_with:
            context.abort(self.fail_with.pop(0), "refused on purpose")
        probs = np.full(10, 0.02, np.float32)
        probs[7] = 0.82
        return pb.InferResponse(request_id=request.request_id, probabilities=probs.tolist(), label=7,
                                timings=pb.ServerTimings(total_ms=0.1))


@pytest.fixture
def server():
    servicer = Servicer()
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=[
        ("grpc.max_send_message_length", DEFAULT_MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE_BYTES),
    ])
    splitinfer_pb2_grpc.add_SplitInferenceServicer_to_server(servicer, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        servicer.release.set()
        srv.stop(0)


def request() -> pb.InferRequest:
    return pb.InferRequest(model="tiny", manifest_sha256="0" * 64, request_id="r1", packet=pb.TokenPacket(num_tokens=1))


def test_success(server):
    target, servicer = server
    with GrpcTransport(target, timeout_s=2.0) as transport:
        assert isinstance(transport, Transport)
        response = transport.infer(request())
    assert response.label == 7 and response.request_id == "r1" and servicer.calls == 1


def test_invalid_argument_maps_to_invalid_packet(server):
    target, servicer = server
    servicer.fail_with = [grpc.StatusCode.INVALID_ARGUMENT]
    with GrpcTransport(target, timeout_s=2.0) as transport, pytest.raises(InvalidPacket, match="refused on purpose"):
        transport.infer(request())


def test_deadline_exceeded(server):
    target, servicer = server
    servicer.stall = True
    with GrpcTransport(target, timeout_s=0.1) as transport, pytest.raises(DeadlineExceeded):
        transport.infer(request())


def test_retries_unavailable_only_when_asked(server):
    target, servicer = server
    servicer.fail_with = [grpc.StatusCode.UNAVAILABLE]
    with GrpcTransport(target, timeout_s=2.0) as transport, pytest.raises(ServerUnavailable):
        transport.infer(request())
    servicer.fail_with = [grpc.StatusCode.UNAVAILABLE]
    with GrpcTransport(target, timeout_s=2.0, max_attempts=3) as transport:
        assert transport.infer(request()).label == 7
    servicer.fail_with = [grpc.StatusCode.INVALID_ARGUMENT]
    calls = servicer.calls
    with GrpcTransport(target, timeout_s=2.0, max_attempts=3) as transport, pytest.raises(InvalidPacket):
        transport.infer(request())
    assert servicer.calls == calls + 1


def test_nothing_listening_fails_fast():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    with GrpcTransport(f"127.0.0.1:{port}", timeout_s=0.5) as transport:
        with pytest.raises((ServerUnavailable, DeadlineExceeded)):
            transport.infer(request())
    assert time.perf_counter() - start < 2.0


def test_closed_transport_and_bad_arguments(server):
    target, _ = server
    transport = GrpcTransport(target)
    transport.close()
    transport.close()
    with pytest.raises(ServerUnavailable, match="closed"):
        transport.infer(request())
    with pytest.raises(ValueError, match="timeout_s"):
        GrpcTransport(target, timeout_s=0)
    with pytest.raises(ValueError, match="max_attempts"):
        GrpcTransport(target, max_attempts=9)
    with pytest.raises(ValueError, match="target"):
        GrpcTransport("")


def test_runner_over_grpc(server, device_session, tiny_manifest, images):
    target, servicer = server
    with GrpcTransport(target, timeout_s=2.0) as transport:
        runner = EdgeRunner(device_session, transport, tiny_manifest, exit_threshold=1.5)
        result = runner.classify(images[0])
        assert result.decided_on == "server" and result.label == 7 and result.bytes_sent > 0
        servicer.fail_with = [grpc.StatusCode.FAILED_PRECONDITION]
        result = runner.classify(images[0])
        assert result.decided_on == "degraded" and "ManifestMismatch" in result.error


class _Recording(Servicer):
    """Also keeps the metadata each call carried."""

    def __init__(self) -> None:
        super().__init__()
        self.metadata: list[dict] = []

    def Infer(self, request, context):
        self.metadata.append(dict(context.invocation_metadata()))
        return super().Infer(request, context)


def _start(servicer):
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    splitinfer_pb2_grpc.add_SplitInferenceServicer_to_server(servicer, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    return srv, f"127.0.0.1:{port}"


def test_round_robin_spreads_calls_over_every_server_and_skips_a_dead_one():
    servicers = [_Recording(), _Recording(), _Recording()]
    started = [_start(s) for s in servicers]
    try:
        targets = [address for _, address in started]
        with GrpcTransport(",".join(targets[:2]), timeout_s=2.0, wait_for_ready=True) as transport:
            assert transport.target.startswith("ipv4:") and transport.max_attempts == 3
            for _ in range(12):
                transport.infer(request())
        assert servicers[0].calls > 0 and servicers[1].calls > 0
        with GrpcTransport(targets, timeout_s=2.0, auth_token="tok-1") as transport:
            for _ in range(6):
                transport.infer(request())
            started[2][0].stop(0).wait()
            for _ in range(6):
                assert transport.infer(request()).label == 7
        assert all(m.get("authorization") == "Bearer tok-1" for s in servicers for m in s.metadata[-1:])
    finally:
        for srv, _ in started:
            srv.stop(0)


def test_unavailable_is_retried_on_another_server_but_nothing_else():
    failing, healthy = Servicer(), Servicer()
    started = [_start(failing), _start(healthy)]
    try:
        failing.fail_with = [grpc.StatusCode.UNAVAILABLE] * 20
        with GrpcTransport([a for _, a in started], timeout_s=2.0, wait_for_ready=True) as transport:
            for _ in range(6):
                assert transport.infer(request()).label == 7
        failing.fail_with = [grpc.StatusCode.INVALID_ARGUMENT] * 20
        healthy.fail_with = [grpc.StatusCode.INVALID_ARGUMENT] * 20
        with GrpcTransport([a for _, a in started], timeout_s=2.0, max_attempts=3) as transport:
            before = failing.calls + healthy.calls
            with pytest.raises(InvalidPacket):
                transport.infer(request())
            assert failing.calls + healthy.calls == before + 1
    finally:
        for srv, _ in started:
            srv.stop(0)


def test_targets_are_split_and_joined():
    assert split_targets("a:1, b:2") == ["a:1", "b:2"]
    assert split_targets(["a:1", "b:2,c:3"]) == ["a:1", "b:2", "c:3"]
    assert split_targets("dns:///svc.local:50051") == ["dns:///svc.local:50051"]
    assert channel_target(["10.0.0.1:5", "10.0.0.2:6"]) == "ipv4:10.0.0.1:5,10.0.0.2:6"
    assert channel_target(["[::1]:5", "[::2]:5"]) == "ipv6:[::1]:5,[::2]:5"
    assert channel_target(["localhost:5"]) == "localhost:5"
    assert channel_target(["localhost:7", "127.0.0.1:8"]).startswith("ipv4:127.0.0.1:7")
    for bad in (["10.0.0.1:5", "[::1]:5"], ["10.0.0.1", "10.0.0.2:5"], ["10.0.0.1:0", "10.0.0.2:5"]):
        with pytest.raises(ValueError):
            channel_target(bad)
    for bad in ("", " , ", [], [""]):
        with pytest.raises(ValueError, match="target"):
            split_targets(bad)
    with pytest.raises(ValueError, match="auth_token"):
        GrpcTransport("127.0.0.1:1", auth_token="two words")
