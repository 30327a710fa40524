"""InferStream: many requests over one call, matched by request_id, with per-message errors, deadlines,
back-pressure; GrpcTransport over it, and its fallback to unary calls against a server without it."""
from __future__ import annotations

import contextlib
import time
from concurrent import futures

import grpc
import numpy as np
import pytest

from splitinfer.cloud import create_server, run_request
from splitinfer.cloud.stream import DEFAULT_STREAM_WINDOW
from splitinfer.edge.transport import GrpcTransport
from splitinfer.protos import (
    DeadlineExceeded,
    InvalidPacket,
    ManifestMismatch,
    ModelNotFound,
    SplitInferError,
    Unauthenticated,
    splitinfer_pb2_grpc,
)
from splitinfer.protos import splitinfer_pb2 as pb

from .conftest import RPC_TIMEOUT_S

CODE = {code.value[0]: code for code in grpc.StatusCode}


def _stream(stub, messages, **kwargs) -> dict[str, pb.StreamResponse]:
    answers = list(stub.InferStream(iter(messages), timeout=RPC_TIMEOUT_S, **kwargs))
    by_id = {a.request_id: a for a in answers}
    assert len(by_id) == len(answers) == len(messages)
    return by_id


def test_answers_match_the_unary_call_by_request_id(stub, make_request) -> None:
    requests = [make_request(count=2 + i % 7, seed=i) for i in range(40)]
    answers = _stream(stub, [pb.StreamRequest(request=r, timeout_ms=5000) for r in requests])
    for request in requests:
        answer = answers[request.request_id]
        assert answer.WhichOneof("outcome") == "response"
        unary = stub.Infer(request, timeout=RPC_TIMEOUT_S)
        np.testing.assert_allclose(answer.response.probabilities, unary.probabilities, rtol=1e-5, atol=1e-6)
        assert answer.response.label == unary.label and answer.response.request_id == request.request_id


def test_each_bad_request_gets_the_unary_calls_code_and_the_stream_goes_on(stub, make_request) -> None:
    good = make_request(seed=1)
    bad_packet = make_request(seed=2)
    bad_packet.packet.num_tokens += 1
    messages = [pb.StreamRequest(request=r) for r in (
        make_request(seed=3, manifest_sha256="0" * 64), make_request(seed=4, model="nope"), bad_packet,
        make_request(seed=5, request_id="x" * 200), good)]
    answers = list(stub.InferStream(iter(messages), timeout=RPC_TIMEOUT_S))
    codes = {a.request_id[:8]: CODE[a.error.code] for a in answers if a.HasField("error")}
    assert codes == {"req-3": grpc.StatusCode.FAILED_PRECONDITION, "req-4": grpc.StatusCode.NOT_FOUND,
                     "req-2": grpc.StatusCode.INVALID_ARGUMENT, "x" * 8: grpc.StatusCode.INVALID_ARGUMENT}
    for answer in answers:
        if answer.HasField("error"):
            with pytest.raises(grpc.RpcError) as info:
                stub.Infer(next(m.request for m in messages if m.request.request_id == answer.request_id),
                           timeout=RPC_TIMEOUT_S)
            assert CODE[answer.error.code] == info.value.code() and answer.error.message == info.value.details()
    (ok,) = [a for a in answers if a.HasField("response")]
    assert ok.request_id == good.request_id


def test_a_message_that_is_not_a_stream_request_ends_the_call_invalid_argument(channel) -> None:
    call = channel.stream_stream("/splitinfer.v1.SplitInference/InferStream")
    with pytest.raises(grpc.RpcError) as info:
        list(call(iter([b"\xff\xff\xff"]), timeout=RPC_TIMEOUT_S))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "StreamRequest" in info.value.details()


def _serve(registry, port: int = 0, **settings):
    server, port = create_server(registry, port=port, **settings)
    server.start()
    return server, port


@contextlib.contextmanager
def _held_model(blocking_registry):
    """A server whose model holds its first batch until ``session.release`` is set: (server, stub, session)."""
    registry, session = blocking_registry
    server, port = _serve(registry)
    session.block.set()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield server, splitinfer_pb2_grpc.SplitInferenceStub(channel), session
    finally:
        session.release.set()
        server.stop(0).wait(5)


def test_a_later_message_with_a_shorter_deadline_expires_first(blocking_registry, make_request) -> None:
    with _held_model(blocking_registry) as (_server, stub, session):
        messages = [pb.StreamRequest(request=make_request(seed=0), timeout_ms=20_000),
                    pb.StreamRequest(request=make_request(seed=1), timeout_ms=20_000),
                    pb.StreamRequest(request=make_request(seed=2), timeout_ms=150)]
        started = time.monotonic()
        call = stub.InferStream(iter(messages), timeout=30)
        first = next(call)  # req-0 holds the model; req-2's 150 ms pass long before the others' 20 s
        waited = time.monotonic() - started
        assert first.request_id == "req-2" and CODE[first.error.code] == grpc.StatusCode.DEADLINE_EXCEEDED
        assert waited < 5.0, waited
        session.release.set()
        session.block.clear()
        rest = list(call)
    assert sorted(a.request_id for a in rest) == ["req-0", "req-1"] and all(a.HasField("response") for a in rest)


def test_per_message_deadline_and_back_pressure(blocking_registry, make_request) -> None:
    with _held_model(blocking_registry) as (server, stub, session):
        total = DEFAULT_STREAM_WINDOW + 40

        def messages():
            yield pb.StreamRequest(request=make_request(seed=0), timeout_ms=100)
            for i in range(1, total):
                yield pb.StreamRequest(request=make_request(seed=i), timeout_ms=20_000)

        call = stub.InferStream(messages(), timeout=30)
        first = next(call)  # the held batch outlives 100 ms: answered DEADLINE_EXCEEDED, stream open
        assert first.request_id == "req-0" and CODE[first.error.code] == grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(0.3)
        in_flight = server._inner.router.in_flight
        # the server read up to its window and stopped (+1: the expired request is still in the held batch)
        assert DEFAULT_STREAM_WINDOW <= in_flight <= DEFAULT_STREAM_WINDOW + 1, in_flight
        session.release.set()
        session.block.clear()
        rest = list(call)
    assert sorted(a.request_id for a in rest) == sorted(f"req-{i}" for i in range(1, total))
    assert all(a.HasField("response") for a in rest)


def test_a_stream_without_the_token_is_unauthenticated(tiny_registry, make_request) -> None:
    server, port = _serve(tiny_registry, auth_tokens=("stream-token",))
    try:
        with GrpcTransport(f"127.0.0.1:{port}", timeout_s=5, streaming=True, auth_token="wrong") as transport:
            with pytest.raises(Unauthenticated):
                transport.infer(make_request())
        with GrpcTransport(f"127.0.0.1:{port}", timeout_s=5, streaming=True, auth_token="stream-token") as transport:
            assert transport.infer(make_request(seed=8)).request_id == "req-8"
    finally:
        server.stop(0).wait(5)


def test_transport_streams_concurrent_requests_with_the_unary_answers_and_errors(live_server, make_request,
                                                                                tiny_registry) -> None:
    requests = [make_request(count=3 + i % 5, seed=i) for i in range(60)]
    with GrpcTransport(live_server.address, timeout_s=5.0, streaming=True) as transport, \
            futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(transport.infer, requests))
        assert transport.streaming and transport._streams[0] is not None and transport._streams[0].alive
        with pytest.raises(ManifestMismatch):
            transport.infer(make_request(seed=1, manifest_sha256="f" * 64))
        with pytest.raises(ModelNotFound):
            transport.infer(make_request(seed=1, model="nope"))
        assert transport.infer(make_request(seed=2)).request_id == "req-2"  # the stream survived the errors
    for request, answer in zip(requests, answers):
        expected = run_request(tiny_registry, request)
        assert answer.request_id == request.request_id and answer.label == expected.label
        np.testing.assert_allclose(answer.probabilities, expected.probabilities, rtol=1e-5, atol=1e-6)


class _OlderServicer(splitinfer_pb2_grpc.SplitInferenceServicer):
    """A server from before InferStream: the generated base answers it UNIMPLEMENTED."""

    def __init__(self, registry) -> None:
        self.registry = registry
        self.calls = 0

    def Infer(self, request, context):
        self.calls += 1
        return run_request(self.registry, request)


def test_transport_falls_back_to_unary_calls_against_an_older_server(tiny_registry, make_request) -> None:
    servicer = _OlderServicer(tiny_registry)
    server = grpc.server(futures.ThreadPoolExecutor(2))
    splitinfer_pb2_grpc.add_SplitInferenceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with GrpcTransport(f"127.0.0.1:{port}", timeout_s=5.0, streaming=True) as transport:
            first = transport.infer(make_request(seed=1))
            assert not transport.streaming  # UNIMPLEMENTED seen once: unary from then on
            second = transport.infer(make_request(seed=2))
        assert (first.request_id, second.request_id) == ("req-1", "req-2") and servicer.calls == 2
    finally:
        server.stop(0).wait(5)


def test_transport_deadline_on_a_stalled_stream(blocking_registry, make_request) -> None:
    registry, session = blocking_registry
    server, port = _serve(registry)
    session.block.set()
    try:
        with GrpcTransport(f"127.0.0.1:{port}", timeout_s=0.2, streaming=True) as transport:
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded):
                transport.infer(make_request(seed=1))
            assert time.monotonic() - started < 2.0
            session.release.set()
            session.block.clear()
            transport.timeout_s = 5.0
            assert transport.infer(make_request(seed=3)).request_id == "req-3"
            with pytest.raises(InvalidPacket):
                bad = make_request(seed=4)
                bad.packet.num_tokens += 1
                transport.infer(bad)
    finally:
        session.release.set()
        server.stop(0).wait(5)


def test_transport_reopens_its_stream_after_the_server_comes_back(tiny_registry, make_request) -> None:
    server, port = _serve(tiny_registry)
    with GrpcTransport(f"127.0.0.1:{port}", timeout_s=2.0, streaming=True) as transport:
        assert transport.infer(make_request(seed=1)).request_id == "req-1"
        server.stop(0).wait(5)
        with pytest.raises(SplitInferError) as info:  # the edge answers degraded on it
            transport.infer(make_request(seed=2))
        assert info.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        server, _ = _serve(tiny_registry, port=port)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    answer = transport.infer(make_request(seed=3))
                    break
                except SplitInferError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            assert answer.request_id == "req-3" and transport.streaming
        finally:
            server.stop(0).wait(5)
