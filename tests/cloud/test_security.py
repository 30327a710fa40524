"""TLS, mutual TLS and bearer tokens on a real server, with certificates made for this test run."""
from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from splitinfer.cloud import SERVICE_NAME, BearerTokenInterceptor, TlsConfig, create_server, read_tokens
from splitinfer.protos import Unauthenticated, from_rpc_error, splitinfer_pb2_grpc

from .conftest import RPC_TIMEOUT_S

TOKEN = "s3cret-token"


def _credentials(certs, client: bool = True, ca=None) -> grpc.ChannelCredentials:
    read = lambda path: path.read_bytes()  # noqa: E731
    if client:
        return grpc.ssl_channel_credentials(read(ca or certs.ca), read(certs.client_key), read(certs.client_cert))
    return grpc.ssl_channel_credentials(read(ca or certs.ca))


@pytest.fixture
def serve(tiny_registry):
    servers = []

    def start(**settings):
        server, port = create_server(tiny_registry, port=0, **settings)
        server.start()
        servers.append(server)
        return port

    yield start
    for server in servers:
        server.stop(0).wait()


def test_tls_serves_a_client_that_trusts_the_ca(serve, certificates, make_request) -> None:
    port = serve(tls=TlsConfig(certificates.server_cert, certificates.server_key))
    with grpc.secure_channel(f"127.0.0.1:{port}", _credentials(certificates, client=False)) as channel:
        response = splitinfer_pb2_grpc.SplitInferenceStub(channel).Infer(make_request(), timeout=RPC_TIMEOUT_S)
    assert response.request_id == "req-0"


def test_tls_is_refused_by_a_client_trusting_another_ca(serve, certificates, make_request) -> None:
    port = serve(tls=TlsConfig(certificates.server_cert, certificates.server_key))
    with grpc.secure_channel(f"127.0.0.1:{port}", _credentials(certificates, False, certificates.other_ca)) as ch:
        with pytest.raises(grpc.RpcError) as info:
            splitinfer_pb2_grpc.SplitInferenceStub(ch).Infer(make_request(), timeout=RPC_TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_needs_a_client_certificate(serve, certificates, make_request) -> None:
    port = serve(tls=TlsConfig(certificates.server_cert, certificates.server_key, certificates.ca))
    target = f"127.0.0.1:{port}"
    with grpc.secure_channel(target, _credentials(certificates, client=False)) as channel:
        with pytest.raises(grpc.RpcError) as info:
            splitinfer_pb2_grpc.SplitInferenceStub(channel).Infer(make_request(), timeout=RPC_TIMEOUT_S)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake fails: no call reaches the server
    with grpc.secure_channel(target, _credentials(certificates, client=True)) as channel:
        assert splitinfer_pb2_grpc.SplitInferenceStub(channel).Infer(make_request(), timeout=RPC_TIMEOUT_S).label >= 0


def test_plaintext_client_cannot_reach_a_tls_server(serve, certificates, make_request) -> None:
    port = serve(tls=TlsConfig(certificates.server_cert, certificates.server_key))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        with pytest.raises(grpc.RpcError) as info:
            splitinfer_pb2_grpc.SplitInferenceStub(channel).Infer(make_request(), timeout=RPC_TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("metadata", [None, (("authorization", "Bearer wrong"),), (("authorization", TOKEN),),
                                      (("authorization", f"Basic {TOKEN}"),)],
                         ids=["missing", "wrong", "no_scheme", "basic"])
def test_wrong_or_missing_token_is_unauthenticated(serve, make_request, metadata) -> None:
    port = serve(auth_tokens=(TOKEN,))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        with pytest.raises(grpc.RpcError) as info:
            splitinfer_pb2_grpc.SplitInferenceStub(channel).Infer(make_request(), timeout=RPC_TIMEOUT_S,
                                                                  metadata=metadata)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert isinstance(from_rpc_error(info.value), Unauthenticated)
    assert TOKEN not in info.value.details()


def test_right_token_over_mutual_tls_is_served_and_health_needs_no_token(serve, certificates, make_request) -> None:
    port = serve(auth_tokens=("old-token", TOKEN),
                 tls=TlsConfig(certificates.server_cert, certificates.server_key, certificates.ca))
    with grpc.secure_channel(f"localhost:{port}", _credentials(certificates)) as channel:
        response = splitinfer_pb2_grpc.SplitInferenceStub(channel).Infer(
            make_request(), timeout=RPC_TIMEOUT_S, metadata=(("authorization", f"bearer {TOKEN}"),))
        assert response.request_id == "req-0"
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT_S)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services_and_needs_the_token(serve) -> None:
    port = serve(auth_tokens=(TOKEN,))
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.ServerReflectionInfo(iter([request]), timeout=RPC_TIMEOUT_S))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        (answer,) = stub.ServerReflectionInfo(iter([request]), timeout=RPC_TIMEOUT_S,
                                              metadata=(("authorization", f"Bearer {TOKEN}"),))
    names = {s.name for s in answer.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names


def test_token_file_and_settings(tmp_path, certificates) -> None:
    path = tmp_path / "tokens"
    path.write_text("# rotated monthly\n\nfirst\n  second  \n")
    assert read_tokens(path) == ("first", "second")
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no token"):
        read_tokens(tmp_path / "empty")
    with pytest.raises(ValueError, match="without whitespace"):
        BearerTokenInterceptor(["two words"])
    with pytest.raises(ValueError, match="not found"):
        TlsConfig(tmp_path / "missing.pem", certificates.server_key)
    assert TlsConfig(certificates.server_cert, certificates.server_key, certificates.ca).mutual
