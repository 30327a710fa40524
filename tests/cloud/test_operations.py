"""Operating the server: metrics over real HTTP, a bounded queue, reload without dropping calls, drain, logs."""
from __future__ import annotations

import dataclasses
import json
import logging
import urllib.request
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from splitinfer.cloud import BatchConfig, ModelRegistry, ModelSource, create_server, find_model_folders
from splitinfer.cloud.logs import JsonFormatter, TextFormatter
from splitinfer.protos.manifest import load_manifest
from splitinfer.protos import sha256_file, splitinfer_pb2_grpc

from .conftest import RPC_TIMEOUT_S, copy_model


def _scrape(url: str) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(url, timeout=RPC_TIMEOUT_S) as response:
        assert response.status == 200
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_endpoint_counts_requests_codes_batches_and_bytes(tiny_registry, make_request) -> None:
    server, port = create_server(tiny_registry, port=0, metrics_port=0)
    server.start()
    try:
        before = _scrape(server.metrics_url)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = splitinfer_pb2_grpc.SplitInferenceStub(channel)
            requests = [make_request(count=3 + i % 4, seed=i) for i in range(6)]
            for request in requests:
                stub.Infer(request, timeout=RPC_TIMEOUT_S)
            for bad in (make_request(model="nope"), make_request(manifest_sha256="0" * 64)):
                with pytest.raises(grpc.RpcError):
                    stub.Infer(bad, timeout=RPC_TIMEOUT_S)
        after = _scrape(server.metrics_url)
    finally:
        server.stop(0).wait()
    moved = lambda name, **labels: _value(after, name, **labels) - _value(before, name, **labels)  # noqa: E731
    assert moved("splitinfer_requests_total", model="tiny", code="OK") == 6
    assert moved("splitinfer_requests_total", model="<unknown>", code="NOT_FOUND") == 1
    assert moved("splitinfer_requests_total", model="tiny", code="FAILED_PRECONDITION") == 1
    assert moved("splitinfer_request_latency_seconds_count", model="tiny") == 7  # answered calls, errors included
    assert moved("splitinfer_batch_size_count", model="tiny") >= 1
    assert moved("splitinfer_batch_size_sum", model="tiny") == 6
    assert moved("splitinfer_request_tokens_sum", model="tiny") == sum(r.packet.num_tokens for r in requests)
    assert moved("splitinfer_received_bytes_total", model="tiny") == sum(r.ByteSize() for r in requests)
    for gauge in ("splitinfer_queue_depth", "splitinfer_in_flight", "splitinfer_model_info"):
        assert any(name == gauge and dict(labels)["model"] == "tiny" for name, labels in after), gauge


def test_a_full_queue_answers_resource_exhausted_and_recovers(blocking_registry, make_request) -> None:
    registry, session = blocking_registry
    server, port = create_server(registry, port=0, batching=BatchConfig(max_batch_size=2, max_queue=3))
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = splitinfer_pb2_grpc.SplitInferenceStub(channel)
            session.block.set()
            running = stub.Infer.future(make_request(seed=0), timeout=RPC_TIMEOUT_S)
            assert session.entered.wait(RPC_TIMEOUT_S)
            queued = [stub.Infer.future(make_request(seed=i), timeout=RPC_TIMEOUT_S) for i in (1, 2, 3)]
            refused = []
            for i in range(4, 40):  # the three above may still be on their way in: keep asking until one is refused
                try:
                    queued.append(stub.Infer(make_request(seed=i), timeout=0.5, wait_for_ready=True))
                except grpc.RpcError as exc:
                    refused.append(exc.code())
                    break
            assert refused == [grpc.StatusCode.RESOURCE_EXHAUSTED]
            session.block.clear()
            session.release.set()
            assert running.result().request_id == "req-0"
            assert [f.result().request_id for f in queued[:3]] == ["req-1", "req-2", "req-3"]
            assert stub.Infer(make_request(seed=50), timeout=RPC_TIMEOUT_S).request_id == "req-50"
    finally:
        session.release.set()
        server.stop(0).wait()


def test_repository_versions_and_reload_without_dropping_in_flight(tiny_model_dir: Path, tmp_path: Path,
                                                                   blocking_registry, make_request) -> None:
    repository = tmp_path / "repository"
    copy_model(tiny_model_dir, repository / "tiny" / "1")
    source = ModelSource(repositories=[repository])
    _, session = blocking_registry
    (model,) = list(source.load())
    registry = ModelRegistry([dataclasses.replace(model, session=session)])
    server, port = create_server(registry, port=0, source=source)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = splitinfer_pb2_grpc.SplitInferenceStub(channel)
            session.block.set()
            in_flight = stub.Infer.future(make_request(seed=1), timeout=RPC_TIMEOUT_S)
            assert session.entered.wait(RPC_TIMEOUT_S)
            newer = copy_model(tiny_model_dir, repository / "tiny" / "2", variant="2")
            assert len(find_model_folders(repository)) == 2
            assert server.reload()
            session.release.set()
            assert in_flight.result().request_id == "req-1"  # finished on the model it started on
            newer_manifest = load_manifest(newer, need=())
            new_sha = newer_manifest.sha256
            assert stub.Infer(make_request(manifest_sha256=new_sha), timeout=RPC_TIMEOUT_S).model_version == newer_manifest.version
            assert stub.Infer(make_request(), timeout=RPC_TIMEOUT_S).request_id == "req-0"  # version 1 still served
            (newer / "server.onnx").write_bytes(b"broken")
            (repository / "tiny" / "3").mkdir()
            copy_model(tiny_model_dir, repository / "broken")
            (repository / "broken" / "server.onnx").write_bytes(b"garbage")
            assert not server.reload()  # a bad folder: the old set stays
            assert stub.Infer(make_request(manifest_sha256=new_sha), timeout=RPC_TIMEOUT_S).model_version == newer_manifest.version
    finally:
        session.release.set()
        server.stop(0).wait()


def test_drain_lets_in_flight_calls_finish(blocking_registry, make_request) -> None:
    registry, session = blocking_registry
    server, port = create_server(registry, port=0)
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = splitinfer_pb2_grpc.SplitInferenceStub(channel)
        session.block.set()
        in_flight = stub.Infer.future(make_request(seed=4), timeout=RPC_TIMEOUT_S)
        assert session.entered.wait(RPC_TIMEOUT_S)
        stopped = server.stop(grace=RPC_TIMEOUT_S)
        with pytest.raises(grpc.RpcError) as info:
            stub.Infer(make_request(), timeout=RPC_TIMEOUT_S)
        # no new calls while draining: refused at the transport, before any handler runs
        assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        session.release.set()
        assert in_flight.result().request_id == "req-4"
    assert stopped.wait(RPC_TIMEOUT_S)


def test_concurrent_clients_with_ragged_requests(tiny_registry, make_request) -> None:
    server, port = create_server(tiny_registry, port=0, batching=BatchConfig(max_batch_size=8))
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = splitinfer_pb2_grpc.SplitInferenceStub(channel)
            requests = [make_request(count=1 + i % 9, seed=i) for i in range(48)]
            with futures.ThreadPoolExecutor(16) as pool:
                answers = list(pool.map(lambda r: stub.Infer(r, timeout=RPC_TIMEOUT_S), requests))
            alone = [stub.Infer(r, timeout=RPC_TIMEOUT_S) for r in requests[:6]]
    finally:
        server.stop(0).wait()
    assert [a.request_id for a in answers] == [r.request_id for r in requests]
    for a, b in zip(answers, alone):
        assert a.probabilities == pytest.approx(b.probabilities, rel=1e-4, abs=1e-6)


def test_log_formatters_carry_the_extra_fields() -> None:
    record = logging.LogRecord("splitinfer.cloud.server", logging.INFO, __file__, 1, "Infer refused: %s", ("NOT_FOUND",),
                               None)
    record.model, record.code = "tiny", "NOT_FOUND"
    data = json.loads(JsonFormatter().format(record))
    assert data["message"] == "Infer refused: NOT_FOUND" and data["model"] == "tiny" and data["level"] == "INFO"
    assert "[model=tiny code=NOT_FOUND]" in TextFormatter().format(record)
