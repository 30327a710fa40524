"""Property-based fuzzing of the packet decoder: any packet either decodes to tokens a server half can
compute on, or raises InvalidPacket; nothing else, and nothing large is allocated on the way."""
from __future__ import annotations

import random
import tracemalloc
from functools import lru_cache

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitinfer.protos import (CodecConfig, InvalidPacket, PacketLimits, decode_tokens, encode_tokens,
                               load_manifest)
from splitinfer.protos import splitinfer_pb2 as pb
from splitinfer.protos.codec import DEFAULT_MAX_ABS_VALUE

from .packet_cases import PACKET_KINDS, bombs, corrupt_packet, packets, valid_packet

DIM, FULL = 32, 65
LIMITS = PacketLimits(dim=DIM, max_position=FULL)
FUZZ = settings(max_examples=1000, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def _check_decoded(tokens: np.ndarray, positions: np.ndarray, packet: pb.TokenPacket) -> None:
    """What a successful decode promises the server half."""
    k = packet.num_tokens
    assert tokens.dtype == np.float32 and tokens.shape == (k, DIM)
    assert positions.dtype == np.int64 and positions.shape == (k,)
    assert np.isfinite(tokens).all() and np.abs(tokens).max() <= DEFAULT_MAX_ABS_VALUE
    assert positions[0] == 0 and np.all(np.diff(positions) > 0) and positions[-1] < FULL


def _decode_or_refuse(packet: pb.TokenPacket) -> bool:
    """True if decoded (and checked), False if refused with InvalidPacket; any other exception fails."""
    try:
        tokens, positions = decode_tokens(packet, LIMITS)
    except InvalidPacket as exc:
        assert str(exc)  # a reason, always
        return False
    _check_decoded(tokens, positions, packet)
    return True


@FUZZ
@given(packets(DIM, FULL))
def test_any_packet_decodes_or_is_refused(packet: pb.TokenPacket) -> None:
    _decode_or_refuse(packet)
    _decode_or_refuse(pb.TokenPacket.FromString(packet.SerializeToString()))  # the wire form too


@settings(max_examples=1000, deadline=None, database=None)
@given(st.binary(max_size=512))
def test_raw_bytes_decode_or_are_refused(data: bytes) -> None:
    try:
        packet = pb.TokenPacket.FromString(data)
    except Exception as exc:  # protobuf refuses them first: the server answers this INVALID_ARGUMENT too
        assert type(exc).__name__ == "DecodeError"
        return
    _decode_or_refuse(packet)


@settings(max_examples=300, deadline=None, database=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from(["fp32", "fp16", "int8", "int4"]), st.sampled_from(["none", "zstd"]),
       st.sampled_from([0, 4, 8]), st.sampled_from(["fp32", "fp16"]))
def test_valid_packets_round_trip(seed: int, encoding: str, compression: str, group: int, scale_dtype: str) -> None:
    rng = np.random.default_rng(seed)
    count = int(rng.integers(1, 20))
    positions = np.r_[0, np.sort(rng.choice(np.arange(1, FULL), count - 1, replace=False))]
    tokens = (rng.standard_normal((count, DIM)) * rng.uniform(0.01, 100.0, (count, 1))).astype(np.float32)
    config = CodecConfig(encoding, compression, group_size=group if encoding in ("int8", "int4") else 0,
                         scale_dtype=scale_dtype)
    packet = encode_tokens(tokens, positions, config)
    decoded, got_positions = decode_tokens(pb.TokenPacket.FromString(packet.SerializeToString()), LIMITS)
    np.testing.assert_array_equal(got_positions, positions)
    step = {"fp32": 0.0, "fp16": 2.0**-10, "int8": 1 / 127, "int4": 1 / 7}[encoding]
    amax = np.abs(tokens).max(axis=1, keepdims=True)
    slack = 2.0**-10 if scale_dtype == "fp16" and encoding in ("int8", "int4") else 0.0  # scale rounding
    assert np.all(np.abs(decoded - tokens) <= amax * (step / 2 + slack) * (1 + 1e-4) + 1e-30)


@lru_cache(maxsize=None)
def _with_dictionary(folder):
    manifest = load_manifest(folder, need=("server",))
    return manifest, PacketLimits.for_manifest(manifest)


@settings(max_examples=300, deadline=None, database=None)
@given(st.integers(0, 2**32 - 1), st.lists(st.integers(0, PACKET_KINDS - 1), max_size=2))
def test_packets_with_a_models_dictionary(tiny_model_dir, seed: int, kinds: list[int]) -> None:
    """The committed tiny model ships a zstd dictionary: its packets decode with it, or are refused."""
    manifest, limits = _with_dictionary(tiny_model_dir)
    assert limits.zstd_dictionary is not None
    rng = random.Random(seed)
    packet = valid_packet(manifest.dim, manifest.num_tokens, rng, dictionary=limits.zstd_dictionary)
    for kind in kinds:
        corrupt_packet(packet, rng, manifest.dim, manifest.num_tokens, kind)
    try:
        tokens, positions = decode_tokens(packet, limits)
    except InvalidPacket:
        assert kinds, "a valid packet was refused"
        return
    assert tokens.shape == (packet.num_tokens, manifest.dim) and np.isfinite(tokens).all()
    assert positions[0] == 0 and np.all(np.diff(positions) > 0) and positions[-1] < manifest.num_tokens


@pytest.mark.parametrize("kind", range(PACKET_KINDS))
def test_every_corruption_kind_is_refused_or_valid(kind: int) -> None:
    """Each kind of break, 200 times from different valid packets; most must be refused."""
    rng = random.Random(kind)
    refused = 0
    for _ in range(200):
        packet = valid_packet(DIM, FULL, rng)
        corrupt_packet(packet, rng, DIM, FULL, kind)
        refused += not _decode_or_refuse(packet)
    assert refused >= 100, f"kind {kind}: only {refused} of 200 refused"


def test_bombs_and_absurd_sizes_allocate_little() -> None:
    """The decoder refuses declared and undeclared bombs and absurd counts without allocating them."""
    rng = random.Random(7)
    bombs()  # made once, outside the measurement
    tracemalloc.start()
    try:
        for kind in (7, 13, 0, 8):
            for _ in range(50):
                packet = valid_packet(DIM, FULL, rng)
                corrupt_packet(packet, rng, DIM, FULL, kind)
                _decode_or_refuse(packet)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"peak {peak} bytes traced while decoding bombs"


@pytest.mark.parametrize("encoding", ["int8", "int4"])
@pytest.mark.parametrize("scale", [3e38, 1e30, 1e7])
def test_huge_scales_are_refused_after_dequantization(encoding: str, scale: float) -> None:
    rng = np.random.default_rng(1)
    tokens = rng.standard_normal((4, DIM)).astype(np.float32)
    packet = encode_tokens(tokens, np.arange(4), CodecConfig(encoding, "none"))
    packet.scales = np.full(4, scale, "<f4").tobytes()
    with pytest.raises(InvalidPacket, match="scale out of range: tokens .* after dequantization"):
        decode_tokens(packet, LIMITS)


def test_value_limit_is_configurable() -> None:
    tokens = np.full((1, DIM), 5e6, np.float32)
    packet = encode_tokens(tokens, np.arange(1), CodecConfig("fp32", "none"))
    with pytest.raises(InvalidPacket, match="out of range"):
        decode_tokens(packet, LIMITS)
    decoded, _ = decode_tokens(packet, PacketLimits(dim=DIM, max_position=FULL, max_abs_value=1e7))
    assert decoded.max() == 5e6
    with pytest.raises(ValueError, match="max_abs_value"):
        PacketLimits(dim=DIM, max_position=FULL, max_abs_value=float("inf"))
