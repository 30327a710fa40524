"""Hostile token packets for the fuzzers: hypothesis strategies, and a fast seeded generator of the same kinds.

Kinds: wrong sizes (num_tokens, dim, payload, uncompressed_size, scales), out-of-range, duplicate,
unsorted or missing positions, truncated, corrupted or foreign zstd frames, decompression bombs
(declared and undeclared sizes), NaN / Inf / huge values and scales, absurd counts and group
sizes, unknown enum values. Each starts from a valid packet, so every check of the decoder is
reached, not only the first.
"""
from __future__ import annotations

import io
import random
from functools import lru_cache

import numpy as np
import zstandard
from hypothesis import strategies as st

from splitinfer.protos import CodecConfig, encode_tokens
from splitinfer.protos import splitinfer_pb2 as pb

U32 = 2**32 - 1
U64 = 2**64 - 1
I32 = (-(2**31), 2**31 - 1)
ENCODINGS = ("fp32", "fp16", "int8", "int4")
HOSTILE_FLOATS = (float("nan"), float("inf"), float("-inf"), 3e38, -3e38, 1e30, 1e12, 65504.0, 1e-45, -1.0, 0.0)


def valid_packet(dim: int, max_position: int, rng: random.Random, *, count: int | None = None,
                 dictionary=None) -> pb.TokenPacket:
    """A packet the decoder accepts: random tokens (|x| < 50) at sorted positions, CLS first, any codec
    (zstd with ``dictionary`` when one is given)."""
    count = count or rng.randint(1, min(12, max_position))
    positions = np.array([0, *sorted(rng.sample(range(1, max_position), count - 1))], dtype=np.int64)
    gen = np.random.default_rng(rng.getrandbits(32))
    tokens = (gen.standard_normal((count, dim)) * gen.uniform(0.01, 20.0, (count, 1))).astype(np.float32)
    encoding = rng.choice(ENCODINGS)
    group = rng.choice([g for g in (0, 0, 4, 8, dim) if g == 0 or dim % g == 0])
    quantized = encoding in ("int8", "int4")
    config = CodecConfig(encoding, rng.choice(("none", "zstd", "auto")), group_size=group if quantized else 0,
                         scale_dtype=rng.choice(("fp32", "fp16")))
    return encode_tokens(tokens, positions, config, zstd_dictionary=dictionary)


def zstd_declaring(size: int) -> bytes:
    """A zstd frame whose header declares ``size`` bytes but holds at most 1 KiB."""
    size = min(max(size, 1), 2**62)  # what a zstd frame header can declare
    content = b"\0" * min(size, 1024)
    out = io.BytesIO()
    writer = zstandard.ZstdCompressor(write_content_size=True).stream_writer(out, size=size, closefd=False)
    writer.write(content)
    writer.flush(zstandard.FLUSH_BLOCK)
    return out.getvalue()


@lru_cache(maxsize=None)
def bombs() -> tuple[bytes, ...]:
    """Small frames that expand far beyond any packet: 1 TiB declared, 64 MiB undeclared, 64 MiB declared."""
    undeclared = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * (64 << 20))
    declared = zstandard.ZstdCompressor(write_content_size=True).compress(b"\0" * (64 << 20))
    return zstd_declaring(1 << 40), undeclared, declared


def _set_positions(packet: pb.TokenPacket, positions) -> None:
    del packet.positions[:]
    packet.positions.extend(int(p) & U32 for p in positions)


def _float_bytes(values, dtype: str) -> bytes:
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(values, dtype=np.float64).astype(dtype).tobytes()


def _edge(rng: random.Random, near: int, top: int = U32) -> int:
    values = [0, 1, near - 1, near, near + 1, 2 * near, 2**16, 2**31 - 1, 2**31, top, rng.randint(0, top)]
    return rng.choice(values) & top


def corrupt_packet(packet: pb.TokenPacket, rng: random.Random, dim: int, max_position: int,
                   kind: int | None = None) -> int:
    """Break ``packet`` in place in one of ``PACKET_KINDS`` ways (random if ``kind`` is None); returns the kind."""
    kind = rng.randrange(PACKET_KINDS) if kind is None else kind % PACKET_KINDS
    k = min(packet.num_tokens, 2 * max_position)  # an earlier break may have made it absurd
    if kind == 0:
        packet.num_tokens = _edge(rng, k)
    elif kind == 1:
        packet.dim = _edge(rng, dim)
    elif kind == 2:
        packet.encoding = rng.choice([rng.randint(*I32), 5, 99, -1, pb.ENCODING_UNSPECIFIED, rng.randint(1, 4)])
    elif kind == 3:
        packet.compression = rng.choice([rng.randint(*I32), 3, -7, rng.randint(0, 2)])
    elif kind == 4:  # positions: duplicate, unsorted, out of range, no CLS, too many or too few, huge
        pos = list(packet.positions)
        choice = rng.randrange(7)
        if choice == 0 and len(pos) > 1:
            pos[rng.randrange(1, len(pos))] = pos[rng.randrange(len(pos))]
        elif choice == 1:
            rng.shuffle(pos)
        elif choice == 2:
            pos[-1:] = [rng.choice([max_position, max_position + 1, U32, rng.randint(max_position, U32)])]
        elif choice == 3:
            pos = [p + 1 for p in pos]
        elif choice == 4:
            pos = pos + [rng.randint(0, U32) for _ in range(rng.randint(1, 5))]
        elif choice == 5:
            pos = pos[: rng.randint(0, max(len(pos) - 1, 0))]
        else:
            pos = [rng.randint(0, U32) for _ in range(len(pos))]
        _set_positions(packet, pos)
    elif kind == 5:  # payload length
        n = len(packet.payload)
        choice = rng.randrange(4)
        if choice == 0:
            packet.payload = packet.payload[: rng.randint(0, max(n - 1, 0))]
        elif choice == 1:
            packet.payload += rng.randbytes(rng.randint(1, 64))
        elif choice == 2:
            packet.payload = b""
        else:
            packet.payload = rng.randbytes(rng.randint(0, 2 * n + 8))
    elif kind == 6:  # zstd frames: truncated, corrupted, garbage, other sizes, on an uncompressed packet
        packet.compression = rng.choice([pb.COMPRESSION_ZSTD, pb.COMPRESSION_ZSTD, pb.COMPRESSION_ZSTD_DICT])
        frame = zstandard.ZstdCompressor(level=1).compress(packet.payload) if not packet.payload.startswith(
            b"\x28\xb5\x2f\xfd") else packet.payload
        choice = rng.randrange(5)
        if choice == 0:
            frame = frame[: rng.randint(0, len(frame) - 1)]
        elif choice == 1:
            b = bytearray(frame)
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            frame = bytes(b)
        elif choice == 2:
            frame = b"\x28\xb5\x2f\xfd" + rng.randbytes(rng.randint(0, 64))
        elif choice == 3:
            frame = zstd_declaring(packet.uncompressed_size + rng.choice([-1, 1, 7]) if packet.uncompressed_size else 1)
        else:
            frame = zstandard.ZstdCompressor(write_content_size=False).compress(rng.randbytes(rng.randint(0, 4096)))
        packet.payload = frame
    elif kind == 7:  # decompression bombs
        packet.compression = pb.COMPRESSION_ZSTD
        packet.payload = rng.choice(bombs())
        if rng.random() < 0.5:
            packet.uncompressed_size = rng.choice([64 << 20, 1 << 40, U64])
    elif kind == 8:
        packet.uncompressed_size = _edge(rng, packet.uncompressed_size, U64)
    elif kind == 9:  # scales: hostile values, wrong lengths, on float encodings
        n = len(packet.scales) // 4 or k
        choice = rng.randrange(4)
        if choice == 0:
            packet.scales = _float_bytes([rng.choice(HOSTILE_FLOATS) for _ in range(n)], "<f4")
        elif choice == 1:
            packet.scales = _float_bytes([rng.choice(HOSTILE_FLOATS)] * max(len(packet.scales) // 2, k), "<f2")
            packet.scales_encoding = pb.ENCODING_FP16
        elif choice == 2:
            packet.scales = rng.randbytes(rng.randint(0, 8 * k + 8))
        else:
            packet.scales = packet.scales[: rng.randint(0, max(len(packet.scales) - 1, 0))]
    elif kind == 10:
        packet.group_size = _edge(rng, packet.group_size or dim)
    elif kind == 11:
        packet.scales_encoding = rng.choice([rng.randint(*I32), 3, 4, 99, -2, rng.randint(0, 2)])
    elif kind == 12:  # hostile values inside a float payload
        if packet.encoding in (pb.ENCODING_FP32, pb.ENCODING_FP16) and packet.compression == pb.COMPRESSION_NONE:
            dtype = "<f4" if packet.encoding == pb.ENCODING_FP32 else "<f2"
            size = np.dtype(dtype).itemsize
            values = np.frombuffer(packet.payload[: len(packet.payload) // size * size], dtype=dtype).astype(np.float64)
            for _ in range(rng.randint(1, 3) if values.size else 0):
                values[rng.randrange(values.size)] = rng.choice(HOSTILE_FLOATS)
            packet.payload = _float_bytes(values, dtype)
        else:
            packet.scales = _float_bytes([3e38] * (len(packet.scales) // 4), "<f4")
    else:  # absurd counts that agree with each other: a huge declared packet
        packet.num_tokens = rng.choice([max_position + 1, 10_000, 2**20, U32])
        packet.uncompressed_size = (packet.num_tokens * packet.dim * 4) & U64
    return kind


PACKET_KINDS = 14


# --- hypothesis strategies: the same hostile space, drawn field by field ------------------------------

def hostile_text(max_size: int = 20_000) -> st.SearchStrategy[str]:
    """Short arbitrary text, or a long run of one character (up to ``max_size``)."""
    long = st.builds(lambda c, n: c * n, st.sampled_from(["m", "\u00e9", "\u4e2d", "\U0001f600", "\0", "'"]),
                     st.integers(129, max_size))
    return st.one_of(st.text(max_size=40), long)


@st.composite
def packets(draw, dim: int, max_position: int) -> pb.TokenPacket:
    """A token packet: valid, or broken in one to three drawn ways, or with every field drawn freely."""
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    if draw(st.integers(0, 9)) == 0:  # every field free
        return pb.TokenPacket(
            num_tokens=draw(st.integers(0, U32)), dim=draw(st.integers(0, U32)),
            encoding=draw(st.integers(*I32)), compression=draw(st.integers(*I32)),
            scales=draw(st.binary(max_size=64)), positions=draw(st.lists(st.integers(0, U32), max_size=16)),
            payload=draw(st.binary(max_size=256)), uncompressed_size=draw(st.integers(0, U64)),
            group_size=draw(st.integers(0, U32)), scales_encoding=draw(st.integers(*I32)))
    packet = valid_packet(dim, max_position, rng)
    for kind in draw(st.lists(st.integers(0, PACKET_KINDS - 1), max_size=3)):
        corrupt_packet(packet, rng, dim, max_position, kind)
    if draw(st.booleans()):  # hypothesis picks exact hostile values for one field
        field = draw(st.sampled_from(["num_tokens", "dim", "group_size", "encoding", "scales_encoding", "scales",
                                      "positions"]))
        if field in ("encoding", "scales_encoding"):
            setattr(packet, field, draw(st.integers(*I32)))
        elif field == "scales":
            n = min(packet.num_tokens, 2 * max_position)
            values = draw(st.lists(st.floats(width=32), min_size=n, max_size=n))
            packet.scales = _float_bytes(values, "<f4")
        elif field == "positions":
            _set_positions(packet, draw(st.lists(st.integers(0, U32), max_size=max_position + 2)))
        else:
            setattr(packet, field, draw(st.integers(0, U32)))
    return packet
