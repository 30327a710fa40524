"""run_request without gRPC: validation, decoding, the server half, softmax, timings."""
from __future__ import annotations

import numpy as np
import pytest

from splitinfer.cloud import MAX_REQUEST_ID_CHARS, ModelRegistry, run_request, softmax
from splitinfer.protos import CodecConfig, InvalidPacket, ServerInternalError, decode_tokens

from .conftest import with_session

CONFIGS = [CodecConfig("fp32", "none"), CodecConfig("fp16", "zstd"), CodecConfig("int8", "zstd")]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.encoding}-{c.compression}")
def test_valid_request_gives_probabilities(tiny_registry: ModelRegistry, tiny_manifest, make_request, config) -> None:
    request = make_request(count=6, config=config, seed=3)
    response = run_request(tiny_registry, request)

    probs = np.asarray(response.probabilities)
    assert probs.shape == (len(tiny_manifest.classes),)
    assert np.all(probs >= 0) and probs.sum() == pytest.approx(1.0, abs=1e-5)
    assert response.label == int(np.argmax(probs))
    assert response.request_id == request.request_id
    assert response.model_version == tiny_manifest.version
    t = response.timings
    assert t.decode_ms >= 0 and t.compute_ms > 0 and t.total_ms >= t.decode_ms + t.compute_ms


def test_matches_the_server_half_run_directly(tiny_registry: ModelRegistry, tiny_manifest, make_request) -> None:
    request = make_request(count=4, seed=7)
    model = tiny_registry.get(tiny_manifest.name, tiny_manifest.sha256)
    tokens, _ = decode_tokens(request.packet, model.packet_limits)
    (logits,) = model.engine.session.run(["logits"], {"tokens": tokens[None], "mask": np.ones((1, 4), bool)})
    expected = np.exp(logits[0] - logits[0].max())
    expected /= expected.sum()
    np.testing.assert_allclose(run_request(tiny_registry, request).probabilities, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("count", ["cls_only", "all_tokens"])
def test_token_count_extremes(tiny_registry: ModelRegistry, tiny_manifest, make_request, count: str) -> None:
    k = 1 if count == "cls_only" else tiny_manifest.num_tokens
    response = run_request(tiny_registry, make_request(count=k))
    assert sum(response.probabilities) == pytest.approx(1.0, abs=1e-5)


def test_request_id_of_the_maximum_length_is_echoed(tiny_registry: ModelRegistry, make_request) -> None:
    request_id = "r" * MAX_REQUEST_ID_CHARS
    assert run_request(tiny_registry, make_request(request_id=request_id)).request_id == request_id


@pytest.mark.parametrize("field, value, message", [
    ("model", "", "model is empty"),
    ("request_id", "r" * (MAX_REQUEST_ID_CHARS + 1), "at most 128"),
    ("packet", None, "packet is missing"),
])
def test_bad_request_fields(tiny_registry: ModelRegistry, make_request, field, value, message) -> None:
    request = make_request()
    if value is None:
        request.ClearField(field)
    else:
        setattr(request, field, value)
    with pytest.raises(InvalidPacket, match=message):
        run_request(tiny_registry, request)


class _NanSession:
    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes

    def run(self, outputs, feeds):
        return [np.full((1, self.num_classes), np.nan, np.float32)]


def test_non_finite_logits_are_a_server_error(tiny_registry: ModelRegistry, tiny_manifest, make_request) -> None:
    model = tiny_registry.get(tiny_manifest.name, tiny_manifest.sha256)
    broken = ModelRegistry([with_session(model, _NanSession(model.num_classes))])
    with pytest.raises(ServerInternalError, match="non-finite logits"):
        run_request(broken, make_request())


def test_softmax_is_stable_and_shift_invariant() -> None:
    logits = np.array([[1000.0, 0.0, -1000.0], [3.0, 1.0, 2.0]], dtype=np.float32)
    probs = softmax(logits)
    assert np.all(np.isfinite(probs))
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0)
    np.testing.assert_allclose(probs[0], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(softmax(logits[1] + 500.0), probs[1])
