from __future__ import annotations

import json

import numpy as np
import pytest

from splitinfer.edge.audit import Audit
from splitinfer.edge.preprocess import preprocess
from splitinfer.edge.runner import EdgeResult, EdgeRunner, OffloadPolicy, softmax
from splitinfer.protos import splitinfer_pb2 as pb
from splitinfer.protos.codec import CodecConfig, PacketLimits, decode_tokens
from splitinfer.protos.errors import ServerUnavailable


class FakeTransport:
    """Records requests; answers with a fixed label, or raises ``error``."""

    def __init__(self, label: int = 3, num_classes: int = 10, error: BaseException | None = None, response=None):
        self.requests: list[pb.InferRequest] = []
        self.label, self.num_classes, self.error, self.response = label, num_classes, error, response

    def infer(self, request: pb.InferRequest) -> pb.InferResponse:
        self.requests.append(request)
        if self.error is not None:
            raise self.error
        if self.response is not None:
            return self.response
        probs = np.full(self.num_classes, 0.01, dtype=np.float32)
        probs[self.label] = 1.0 - 0.01 * (self.num_classes - 1)
        return pb.InferResponse(request_id=request.request_id, probabilities=probs.tolist(), label=self.label)


def exit_answer(session, manifest, image):
    logits = session.run(preprocess(image, manifest.preprocessing)).exit[0]
    probs = softmax(logits)
    return int(np.argmax(probs)), probs


def test_threshold_zero_always_device(device_session, tiny_manifest, images):
    transport = FakeTransport(num_classes=len(tiny_manifest.classes))
    runner = EdgeRunner(device_session, transport, tiny_manifest, exit_threshold=0.0)
    for image, result in zip(images, runner.classify_many(images)):
        label, probs = exit_answer(device_session, tiny_manifest, image)
        assert result.decided_on == "device"
        assert result.bytes_sent == 0 and result.tokens_sent == 0 and result.server_ms is None
        assert result.label == label and result.class_name == tiny_manifest.classes[label]
        # the exit policy's confidence, as device.onnx computes it (view consistency here)
        assert result.confidence == pytest.approx(float(device_session.run(
            preprocess(image, tiny_manifest.preprocessing)).confidence[0]))
        assert result.probabilities == pytest.approx(tuple(probs))
        assert result.request_id is None and result.error is None
    assert transport.requests == []


def test_threshold_above_one_always_offloads_selected_tokens(device_session, tiny_manifest, images):
    k = len(tiny_manifest.classes)
    transport = FakeTransport(label=3, num_classes=k)
    budget = 5
    runner = EdgeRunner(device_session, transport, tiny_manifest, exit_threshold=1.5, budget=budget)
    limits = PacketLimits(tiny_manifest.dim, max_position=tiny_manifest.num_tokens)
    results = runner.classify_many(images)
    assert len(transport.requests) == len(images)
    for image, result, request in zip(images, results, transport.requests):
        assert result.decided_on == "server" and result.label == 3 and result.class_name == tiny_manifest.classes[3]
        assert result.bytes_sent == request.ByteSize() > 0
        assert result.server_ms is not None and result.error is None
        assert request.model == tiny_manifest.name and request.manifest_sha256 == tiny_manifest.sha256
        assert result.request_id == request.request_id

        tokens, positions = decode_tokens(request.packet, limits)
        assert positions[0] == 0 and 2 <= len(positions) <= budget + 1
        assert result.tokens_sent == len(positions)
        out = device_session.run(preprocess(image, tiny_manifest.preprocessing))
        np.testing.assert_array_equal(positions, runner.select(out.importance[0]))
        expected = out.tokens[0][positions]
        int8_step = np.abs(expected).max(axis=1, keepdims=True) / 127
        assert np.all(np.abs(tokens - expected) <= int8_step / 2 + 1e-6)
    assert len({r.request_id for r in results}) == len(results)


def test_manifest_codec_and_fp32_override(device_session, tiny_manifest, images):
    transport = FakeTransport(num_classes=len(tiny_manifest.classes))
    runner = EdgeRunner(device_session, transport, tiny_manifest, codec=CodecConfig("fp32", "none"),
                        exit_threshold=2)
    runner.classify(images[0])
    packet = transport.requests[0].packet
    assert packet.encoding == pb.ENCODING_FP32 and packet.compression == pb.COMPRESSION_NONE
    tokens, positions = decode_tokens(packet, PacketLimits(tiny_manifest.dim, tiny_manifest.num_tokens))
    out = device_session.run(preprocess(images[0], tiny_manifest.preprocessing))
    np.testing.assert_array_equal(tokens, out.tokens[0][positions])
    default_codec = EdgeRunner(device_session, None, tiny_manifest).codec
    assert (default_codec.encoding, default_codec.compression) == (tiny_manifest.codec.encoding, tiny_manifest.codec.compression)
    for key in ("group_size", "scale_dtype"):
        if key in tiny_manifest.codec.to_json():
            assert getattr(default_codec, key) == tiny_manifest.codec.to_json()[key]


@pytest.mark.parametrize("error", [ServerUnavailable("UNAVAILABLE: connection refused"), RuntimeError("boom")])
def test_transport_failure_degrades_to_exit_answer(device_session, tiny_manifest, images, error):
    transport = FakeTransport(error=error)
    runner = EdgeRunner(device_session, transport, tiny_manifest, exit_threshold=1.5)
    result = runner.classify(images[1])
    label, probs = exit_answer(device_session, tiny_manifest, images[1])
    assert result.decided_on == "degraded"
    assert result.label == label and result.probabilities == pytest.approx(tuple(probs))
    assert result.confidence == pytest.approx(float(device_session.run(
        preprocess(images[1], tiny_manifest.preprocessing)).confidence[0]))
    assert type(error).__name__ in result.error and str(error) in result.error
    assert result.bytes_sent == transport.requests[0].ByteSize() and result.request_id == transport.requests[0].request_id


def test_malformed_response_degrades(device_session, tiny_manifest, images):
    bad = pb.InferResponse(probabilities=[0.5, 0.5], label=0)
    runner = EdgeRunner(device_session, FakeTransport(response=bad), tiny_manifest, exit_threshold=1.5)
    result = runner.classify(images[0])
    assert result.decided_on == "degraded" and "probabilities" in result.error

    wrong_id = pb.InferResponse(request_id="someone-else", probabilities=[0.1] * len(tiny_manifest.classes), label=0)
    runner = EdgeRunner(device_session, FakeTransport(response=wrong_id), tiny_manifest, exit_threshold=1.5)
    assert runner.classify(images[0]).decided_on == "degraded"


def test_no_transport_decides_on_device(device_session, tiny_manifest, images):
    runner = EdgeRunner(device_session, None, tiny_manifest, exit_threshold=1.5)
    result = runner.classify(images[2])
    assert result.decided_on == "device" and result.bytes_sent == 0 and result.error is None


def test_other_image_sizes_are_resized(device_session, tiny_manifest):
    runner = EdgeRunner(device_session, None, tiny_manifest)
    result = runner.classify(np.full((100, 37), 255, dtype=np.uint8))
    assert result.decided_on == "device" and 0 <= result.label < len(tiny_manifest.classes)


def test_policy_defaults_and_validation(device_session, tiny_manifest):
    runner = EdgeRunner(device_session, None, tiny_manifest)
    assert runner.policy == OffloadPolicy(tiny_manifest.exit_threshold, tiny_manifest.selection.mass,
                                          tiny_manifest.selection.budget, 1)
    with pytest.raises(ValueError, match="exit_threshold"):
        OffloadPolicy(float("nan"), 0.9, 8)
    with pytest.raises(ValueError, match="mass"):
        EdgeRunner(device_session, None, tiny_manifest, mass=0.0)
    with pytest.raises(ValueError, match="budget"):
        EdgeRunner(device_session, None, tiny_manifest, budget=0)
    with pytest.raises(ValueError, match="an image is uint8"):
        runner.classify(np.zeros((2, 8, 8), np.uint8))


def test_result_to_dict_is_json(device_session, tiny_manifest, images):
    result = EdgeRunner(device_session, None, tiny_manifest).classify(images[0])
    data = json.loads(json.dumps(result.to_dict()))
    assert set(data) >= {"label", "class_name", "confidence", "probabilities", "decided_on", "bytes_sent",
                         "tokens_sent", "latency_ms", "device_ms", "server_ms", "error", "request_id"}
    assert len(data["probabilities"]) == len(tiny_manifest.classes)
    with pytest.raises(ValueError, match="decided_on"):
        EdgeResult(label=0, class_name="0", confidence=1.0, probabilities=(1.0,), decided_on="cloud")


def test_audit_offloads_device_answers_and_keeps_them(device_session, tiny_manifest, images):
    k = len(tiny_manifest.classes)
    labels = [exit_answer(device_session, tiny_manifest, image)[0] for image in images]
    transport = FakeTransport(label=labels[0], num_classes=k)
    audit = Audit(rate=1.0, calibrated_disagreement=0.01, rng=0)
    runner = EdgeRunner(device_session, transport, tiny_manifest, exit_threshold=0.0, audit=audit)
    result = runner.classify(images[0])
    assert result.decided_on == "device" and result.audited and result.label == labels[0]
    assert result.bytes_sent == transport.requests[0].ByteSize() > 0 and result.bytes_received > 0
    assert transport.requests[0].purpose == pb.PURPOSE_AUDIT and not transport.requests[0].drift_alarm
    assert audit.audits == 1 and audit.disagreements == 0


def test_audit_alarm_offloads_everything_marked_and_an_audit_failure_keeps_the_device_answer(
        device_session, tiny_manifest, images):
    k = len(tiny_manifest.classes)
    label = exit_answer(device_session, tiny_manifest, images[0])[0]
    transport = FakeTransport(label=(label + 1) % k, num_classes=k)  # the server always disagrees
    audit = Audit(rate=1.0, calibrated_disagreement=0.01, rng=0)
    runner = EdgeRunner(device_session, transport, tiny_manifest, exit_threshold=0.0, audit=audit)
    results = [runner.classify(images[0]) for _ in range(6)]
    assert audit.alarm and audit.alarms == 1
    first_after = next(i for i, r in enumerate(results) if not r.audited)
    assert all(r.decided_on == "server" and r.label == (label + 1) % k for r in results[first_after:])
    assert all(q.drift_alarm and q.purpose == pb.PURPOSE_ANSWER for q in transport.requests[first_after:])

    failing = EdgeRunner(device_session, FakeTransport(error=ServerUnavailable("down")), tiny_manifest,
                         exit_threshold=0.0, audit=Audit(rate=1.0, calibrated_disagreement=0.01, rng=0))
    result = failing.classify(images[0])
    assert result.decided_on == "device" and result.audited and result.failure == "outage"
    assert result.label == label and failing.audit.audits == 0


def test_no_audit_without_a_transport(device_session, tiny_manifest, images):
    runner = EdgeRunner(device_session, None, tiny_manifest, exit_threshold=0.0, audit=Audit(rate=1.0, rng=0))
    assert runner.audit is None and not runner.classify(images[0]).audited
