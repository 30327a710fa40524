import numpy as np
import pytest
import zstandard

from splitinfer.protos import CodecConfig, InvalidPacket, PacketLimits, decode_tokens, encode_tokens
from splitinfer.protos import splitinfer_pb2 as pb
from splitinfer.protos.codec import dequantize_int8, quantize_int8

DIM, FULL = 48, 65
LIMITS = PacketLimits(dim=DIM, max_position=FULL)


def _tokens(k=9, seed=0):
    rng = np.random.default_rng(seed)
    tokens = (rng.normal(size=(k, DIM)) * rng.uniform(0.1, 10, size=(k, 1))).astype(np.float32)
    positions = np.r_[0, np.sort(rng.choice(np.arange(1, FULL), k - 1, replace=False))]
    return tokens, positions


@pytest.mark.parametrize("compression", ["none", "zstd"])
@pytest.mark.parametrize("encoding", ["fp32", "fp16", "int8"])
def test_round_trip_every_encoding(encoding, compression):
    tokens, positions = _tokens()
    packet = encode_tokens(tokens, positions, CodecConfig(encoding, compression))
    wire = pb.TokenPacket.FromString(packet.SerializeToString())
    decoded, pos = decode_tokens(wire, LIMITS)
    assert decoded.dtype == np.float32 and decoded.shape == tokens.shape
    np.testing.assert_array_equal(pos, positions)
    amax = np.abs(tokens).max(axis=1, keepdims=True)
    err = np.abs(decoded - tokens)
    if encoding == "fp32":
        assert err.max() == 0
    elif encoding == "fp16":
        assert np.all(err <= np.abs(tokens) * 2**-10 + 1e-7)
    else:  # half a quantization step per token
        assert np.all(err <= amax / 127 / 2 * (1 + 1e-5))


def test_int8_zero_token_and_sizes():
    tokens = np.zeros((2, DIM), np.float32)
    q, s = quantize_int8(tokens)
    assert np.all(q == 0) and np.all(s == 1)
    np.testing.assert_array_equal(dequantize_int8(q, s), tokens)
    t, p = _tokens(k=17)
    fp32 = encode_tokens(t, p, CodecConfig("fp32", "none")).ByteSize()
    int8 = encode_tokens(t, p, CodecConfig("int8", "none")).ByteSize()
    assert int8 < fp32 / 3.5


def test_encode_rejects_bad_input():
    t, p = _tokens()
    with pytest.raises(ValueError, match="positions"):
        encode_tokens(t, p[:-1])
    t[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        encode_tokens(t, p)
    with pytest.raises(ValueError, match="encoding"):
        CodecConfig(encoding="int3")


def _mutate(field, value, base=None):
    packet = base or encode_tokens(*_tokens(), CodecConfig("int8", "none"))
    packet = pb.TokenPacket.FromString(packet.SerializeToString())
    if field == "positions":
        del packet.positions[:]
        packet.positions.extend(value)
    else:
        setattr(packet, field, value)
    return packet


BAD = {
    "unknown encoding": lambda: _mutate("encoding", 9),
    "unspecified encoding": lambda: _mutate("encoding", 0),
    "unknown compression": lambda: _mutate("compression", 7),
    "zero tokens": lambda: _mutate("num_tokens", 0),
    "too many tokens": lambda: _mutate("num_tokens", FULL + 1),
    "wrong dim": lambda: _mutate("dim", DIM + 1),
    "positions count": lambda: _mutate("positions", [0, 1, 2]),
    "duplicate positions": lambda: _mutate("positions", [0, 1, 1, 2, 3, 4, 5, 6, 7]),
    "unsorted positions": lambda: _mutate("positions", [0, 2, 1, 3, 4, 5, 6, 7, 8]),
    "position out of range": lambda: _mutate("positions", [0, 1, 2, 3, 4, 5, 6, 7, FULL]),
    "missing CLS": lambda: _mutate("positions", [1, 2, 3, 4, 5, 6, 7, 8, 9]),
    "uncompressed size": lambda: _mutate("uncompressed_size", 5),
    "payload length": lambda: _mutate("payload", b"\x00" * 10),
    "scales length": lambda: _mutate("scales", b"\x00" * 3),
    "negative scale": lambda: _mutate("scales", np.full(9, -1, "<f4").tobytes()),
    "garbage zstd": lambda: _mutate("compression", pb.COMPRESSION_ZSTD),
    "zstd bomb": lambda: _mutate("payload", zstandard.ZstdCompressor().compress(b"\x00" * (1 << 22)),
                                  base=encode_tokens(*_tokens(), CodecConfig("int8", "zstd"))),
    "zstd short": lambda: _mutate("payload", zstandard.ZstdCompressor().compress(b"\x00" * 10),
                                   base=encode_tokens(*_tokens(), CodecConfig("int8", "zstd"))),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_malformed_packets_raise_invalid_packet(kind):
    with pytest.raises(InvalidPacket):
        decode_tokens(BAD[kind](), LIMITS)


def test_nan_in_fp32_payload_rejected():
    t, p = _tokens()
    packet = encode_tokens(t, p, CodecConfig("fp32", "none"))
    raw = np.frombuffer(packet.payload, "<f4").copy()
    raw[3] = np.inf
    packet.payload = raw.tobytes()
    with pytest.raises(InvalidPacket, match="NaN or inf"):
        decode_tokens(packet, LIMITS)


def test_decompressed_size_capped():
    t, p = _tokens(k=17)
    packet = encode_tokens(t, p, CodecConfig("fp32", "zstd"))
    with pytest.raises(InvalidPacket, match="exceeds the limit"):
        decode_tokens(packet, PacketLimits(dim=DIM, max_position=FULL, max_decompressed_bytes=1000))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group_size", [0, 8, 16])
@pytest.mark.parametrize("scale_dtype", ["fp32", "fp16"])
def test_low_bit_round_trip_and_error_bound(bits, group_size, scale_dtype):
    tokens, positions = _tokens(k=13, seed=bits + group_size)
    config = CodecConfig(f"int{bits}", "auto", group_size=group_size, scale_dtype=scale_dtype)
    packet = pb.TokenPacket.FromString(encode_tokens(tokens, positions, config).SerializeToString())
    decoded, pos = decode_tokens(packet, LIMITS)
    np.testing.assert_array_equal(pos, positions)
    g = DIM // group_size if group_size else 1
    amax = np.abs(tokens.reshape(13, g, -1)).max(axis=-1, keepdims=True)
    qmax = 127 if bits == 8 else 7
    # half a step, plus the float16 rounding of the scale (relative 2^-11) times the largest |q|
    bound = amax / qmax / 2 + (amax * 2**-11 if scale_dtype == "fp16" else 0) + 1e-6
    err = np.abs(decoded - tokens).reshape(13, g, -1)
    assert np.all(err <= bound)
    if bits == 4:
        assert len(packet.payload) <= 13 * DIM // 2 or packet.compression != pb.COMPRESSION_NONE
        assert packet.uncompressed_size == 13 * DIM // 2


def test_int4_packing_round_trip():
    from splitinfer.protos.codec import pack_int4, unpack_int4

    q = np.arange(-7, 8, dtype=np.int8).repeat(2)
    np.testing.assert_array_equal(unpack_int4(pack_int4(q), q.size), q)
    assert len(pack_int4(q)) == q.size // 2
    # every pair of values, as a (K, 2) array, a flat one and a strided view: the byte is lo | hi << 4
    lo, hi = np.meshgrid(np.arange(-8, 8), np.arange(-8, 8), indexing="ij")
    pairs = np.stack([lo.ravel(), hi.ravel()], axis=1).astype(np.int8)
    expected = bytes(((a & 0x0F) | (b & 0x0F) << 4) for a, b in pairs.tolist())
    assert pack_int4(pairs) == pack_int4(pairs.ravel()) == expected
    wide = np.repeat(pairs, 2, axis=1)[:, ::2]  # not contiguous
    assert pack_int4(wide) == expected
    np.testing.assert_array_equal(unpack_int4(expected, pairs.size).reshape(-1, 2), pairs)
    with pytest.raises(ValueError, match="even count"):
        pack_int4(np.zeros(5, dtype=np.int8))


def test_bytes_shrink_with_bits_and_groups():
    tokens, positions = _tokens(k=17)
    size = lambda **kw: encode_tokens(tokens, positions, CodecConfig(compression="none", **kw)).ByteSize()  # noqa: E731
    assert size(encoding="int4", scale_dtype="fp16") < size(encoding="int8", scale_dtype="fp16") < size(encoding="int8")
    assert size(encoding="int8", group_size=8) > size(encoding="int8")  # more scales, more bytes


def test_auto_compression_keeps_only_what_pays():
    rng = np.random.default_rng(0)
    noise = rng.uniform(-1, 1, size=(9, DIM)).astype(np.float32)
    packet = encode_tokens(noise, np.arange(9), CodecConfig("int8", "auto"))
    assert packet.compression == pb.COMPRESSION_NONE  # uniform int8 codes do not compress
    assert encode_tokens(noise, np.arange(9), CodecConfig("int8", "zstd")).compression == pb.COMPRESSION_ZSTD
    zeros = np.zeros((9, DIM), np.float32)
    zeros[:, 0] = 1
    packet = encode_tokens(zeros, np.arange(9), CodecConfig("fp32", "auto"))
    assert packet.compression == pb.COMPRESSION_ZSTD and len(packet.payload) < 9 * DIM * 4
    np.testing.assert_array_equal(decode_tokens(packet, LIMITS)[0], zeros)


def test_zstd_dictionary_round_trip_and_refusal_without_it():
    samples = []
    for i in range(200):
        t, p = _tokens(k=5, seed=i)
        samples.append(encode_tokens(np.round(t), p, CodecConfig("int8", "none")).payload)
    dictionary = zstandard.train_dictionary(1024, samples)
    t, p = _tokens(k=5, seed=999)
    packet = encode_tokens(np.round(t), p, CodecConfig("int8", "zstd"), zstd_dictionary=dictionary)
    assert packet.compression == pb.COMPRESSION_ZSTD_DICT
    with_dict = PacketLimits(dim=DIM, max_position=FULL, zstd_dictionary=dictionary.as_bytes())
    decoded, _ = decode_tokens(packet, with_dict)
    np.testing.assert_allclose(decoded, np.round(t), atol=np.abs(t).max() / 127)
    with pytest.raises(InvalidPacket, match="dictionary"):
        decode_tokens(packet, LIMITS)


@pytest.mark.parametrize("field, value", [
    ("group_size", 7), ("group_size", DIM * 2), ("scales_encoding", 4),
])
def test_bad_group_and_scale_fields(field, value):
    packet = encode_tokens(*_tokens(), CodecConfig("int8", "none"))
    setattr(packet, field, value)
    with pytest.raises(InvalidPacket):
        decode_tokens(packet, LIMITS)


def test_group_fields_on_float_packet_rejected():
    packet = encode_tokens(*_tokens(), CodecConfig("fp16", "none"))
    packet.group_size = 8
    with pytest.raises(InvalidPacket, match="int8/int4 only"):
        decode_tokens(packet, LIMITS)


def test_decode_batch_agrees_with_decode_tokens_and_fails_only_the_bad_packets():
    from splitinfer.protos.codec import decode_batch

    packets = []
    for i, (encoding, group, scale_dtype) in enumerate([("int4", 0, "fp16"), ("int8", 0, "fp32"), ("int4", 0, "fp16"),
                                                        ("int8", 12, "fp16"), ("fp16", 0, "fp32"), ("int4", 0, "fp16")]):
        tokens, positions = _tokens(k=3 + i, seed=i)
        packets.append(encode_tokens(tokens, positions, CodecConfig(encoding, "zstd", group_size=group,
                                                                    scale_dtype=scale_dtype)))
    huge = pb.TokenPacket()
    huge.CopyFrom(packets[1])
    huge.scales = np.full(huge.num_tokens, 3e38, "<f4").tobytes()  # finite scales, tokens beyond the limit
    nan = pb.TokenPacket()
    nan.CopyFrom(packets[4])
    nan.compression, nan.payload = pb.COMPRESSION_NONE, np.full((nan.num_tokens, DIM), np.nan, "<f2").tobytes()
    shuffled = pb.TokenPacket()
    shuffled.CopyFrom(packets[0])
    shuffled.positions[:] = list(shuffled.positions)[::-1]
    batch = [packets[0], huge, packets[1], nan, packets[2], shuffled, packets[3], packets[4], packets[5]]
    decoded = decode_batch(batch, LIMITS)
    assert len(decoded) == len(batch)
    for packet, got in zip(batch, decoded):
        try:
            expected = decode_tokens(packet, LIMITS)[0]
        except InvalidPacket as exc:
            assert isinstance(got, InvalidPacket) and str(got) == str(exc)
            continue
        assert isinstance(got, np.ndarray)
        np.testing.assert_array_equal(got, expected)
    assert [isinstance(d, InvalidPacket) for d in decoded] == [False, True, False, True, False, True, False, False, False]


def test_decode_batch_decompresses_together_and_a_bad_frame_fails_only_itself():
    import zstandard

    from splitinfer.protos.codec import decode_batch

    packets = [encode_tokens(*_tokens(k=2 + i, seed=i), CodecConfig("int8", "zstd")) for i in range(4)]
    bomb = pb.TokenPacket()  # a frame without a declared size that expands far beyond uncompressed_size
    bomb.CopyFrom(packets[1])
    bomb.payload = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * 10_000_000)
    truncated = pb.TokenPacket()
    truncated.CopyFrom(packets[2])
    truncated.payload = truncated.payload[:-3]
    nan_scale = pb.TokenPacket()
    nan_scale.CopyFrom(packets[3])
    nan_scale.scales = np.array([1.0] + [np.nan] * (nan_scale.num_tokens - 1), "<f4").tobytes()
    batch = [packets[0], bomb, packets[1], truncated, nan_scale, packets[2], packets[3]]
    decoded = decode_batch(batch, LIMITS)
    assert [type(d).__name__ for d in decoded] == ["ndarray", "InvalidPacket", "ndarray", "InvalidPacket",
                                                   "InvalidPacket", "ndarray", "ndarray"]
    assert "does not decompress" in str(decoded[1]) and "does not decompress" in str(decoded[3])
    assert "finite and non-negative" in str(decoded[4])
    for got, packet in zip([decoded[0], decoded[2], decoded[5], decoded[6]], packets):
        np.testing.assert_array_equal(got, decode_tokens(packet, LIMITS)[0])
