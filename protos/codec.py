"""Token codec: float32 tokens <-> ``TokenPacket`` (fp32 / fp16 / int8 per-token scale, optional zstd).

Pure numpy. Every decode validates before it allocates: the declared sizes must agree with each
other and with the caller's limits before any buffer is decompressed or converted, and zstd output
is capped at the size the header fields imply (no decompression bombs). Every failure raises
:class:`~splitinfer.protos.errors.InvalidPacket` with the reason.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import zstandard

from . import splitinfer_pb2 as pb
from .errors import InvalidPacket

__all__ = ["CodecConfig", "PacketLimits", "ENCODINGS", "COMPRESSIONS", "encode_tokens", "decode_tokens",
           "quantize_int8", "dequantize_int8"]

ENCODINGS = {"fp32": pb.ENCODING_FP32, "fp16": pb.ENCODING_FP16, "int8": pb.ENCODING_INT8}
COMPRESSIONS = {"none": pb.COMPRESSION_NONE, "zstd": pb.COMPRESSION_ZSTD}
_VALUE_BYTES = {pb.ENCODING_FP32: 4, pb.ENCODING_FP16: 2, pb.ENCODING_INT8: 1}
_DTYPES = {pb.ENCODING_FP32: np.dtype("<f4"), pb.ENCODING_FP16: np.dtype("<f2"), pb.ENCODING_INT8: np.dtype("i1")}
INT8_MAX = 127.0


@dataclass(frozen=True)
class CodecConfig:
    """How the edge encodes tokens: ``encoding`` in fp32/fp16/int8, ``compression`` in none/zstd."""

    encoding: str = "int8"
    compression: str = "zstd"
    zstd_level: int = 3

    def __post_init__(self) -> None:
        if self.encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {sorted(ENCODINGS)}, got {self.encoding!r}")
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {sorted(COMPRESSIONS)}, got {self.compression!r}")
        if not 1 <= self.zstd_level <= 22:
            raise ValueError(f"zstd_level must be in [1, 22], got {self.zstd_level}")


@dataclass(frozen=True)
class PacketLimits:
    """What a receiver accepts. ``max_position`` is the full sequence length (1 + patches)."""

    dim: int
    max_position: int
    max_tokens: int | None = None  # default: max_position
    require_cls: bool = True  # position 0 (CLS) must be present
    max_decompressed_bytes: int = 16 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.dim < 1 or self.max_position < 1:
            raise ValueError(f"dim and max_position must be >= 1, got {self.dim}, {self.max_position}")


def quantize_int8(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """tokens float32 (K, d) -> (int8 (K, d), float32 scales (K,)); symmetric, round half to even."""
    tokens = np.asarray(tokens, dtype=np.float32)
    amax = np.abs(tokens).max(axis=-1, keepdims=True)
    scale = np.where(amax > 0, amax / np.float32(INT8_MAX), np.float32(1.0)).astype(np.float32)
    q = np.clip(np.rint(tokens / scale), -INT8_MAX, INT8_MAX).astype(np.int8)
    return q, scale[:, 0]


def dequantize_int8(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """int8 (K, d), float32 (K,) -> float32 (K, d)."""
    return q.astype(np.float32) * scales.astype(np.float32)[:, None]


def encode_tokens(tokens: np.ndarray, positions: np.ndarray, config: CodecConfig = CodecConfig()) -> pb.TokenPacket:
    """tokens float32 (K, d), positions int (K,) strictly increasing -> TokenPacket."""
    tokens = np.asarray(tokens, dtype=np.float32)
    positions = np.asarray(positions)
    if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise ValueError(f"tokens must be a non-empty (K, d) array, got shape {tokens.shape}")
    if positions.shape != (tokens.shape[0],):
        raise ValueError(f"positions must have shape ({tokens.shape[0]},), got {positions.shape}")
    if not np.all(np.isfinite(tokens)):
        raise ValueError("tokens contain NaN or inf")
    encoding = ENCODINGS[config.encoding]
    scales = b""
    if encoding == pb.ENCODING_INT8:
        q, s = quantize_int8(tokens)
        raw, scales = q.tobytes(), s.astype("<f4").tobytes()
    else:
        raw = tokens.astype(_DTYPES[encoding]).tobytes()
    compression = COMPRESSIONS[config.compression]
    payload = raw
    if compression == pb.COMPRESSION_ZSTD:
        payload = zstandard.ZstdCompressor(level=config.zstd_level, write_content_size=True).compress(raw)
    return pb.TokenPacket(
        num_tokens=tokens.shape[0], dim=tokens.shape[1], encoding=encoding, compression=compression,
        scales=scales, positions=positions.astype(np.int64).tolist(), payload=payload, uncompressed_size=len(raw),
    )


def decode_tokens(packet: pb.TokenPacket, limits: PacketLimits) -> tuple[np.ndarray, np.ndarray]:
    """TokenPacket -> (tokens float32 (K, d), positions int64 (K,)), or InvalidPacket."""
    k, d = packet.num_tokens, packet.dim
    max_tokens = limits.max_tokens or limits.max_position
    if packet.encoding not in _VALUE_BYTES:
        raise InvalidPacket(f"unknown encoding {packet.encoding}")
    if packet.compression not in (pb.COMPRESSION_NONE, pb.COMPRESSION_ZSTD):
        raise InvalidPacket(f"unknown compression {packet.compression}")
    if not 1 <= k <= max_tokens:
        raise InvalidPacket(f"num_tokens must be in [1, {max_tokens}], got {k}")
    if d != limits.dim:
        raise InvalidPacket(f"dim must be {limits.dim} for this model, got {d}")
    if len(packet.positions) != k:
        raise InvalidPacket(f"{len(packet.positions)} positions for {k} tokens")
    positions = np.fromiter(packet.positions, dtype=np.int64, count=k)
    if np.any(np.diff(positions) <= 0):
        raise InvalidPacket("positions must be strictly increasing (unique and sorted)")
    if positions[-1] >= limits.max_position:
        raise InvalidPacket(f"position {positions[-1]} out of range [0, {limits.max_position})")
    if limits.require_cls and positions[0] != 0:
        raise InvalidPacket("the CLS token (position 0) must be sent")
    raw_size = k * d * _VALUE_BYTES[packet.encoding]
    if packet.uncompressed_size != raw_size:
        raise InvalidPacket(f"uncompressed_size {packet.uncompressed_size} != num_tokens*dim*bytes = {raw_size}")
    if raw_size > limits.max_decompressed_bytes:
        raise InvalidPacket(f"payload of {raw_size} bytes exceeds the limit of {limits.max_decompressed_bytes}")
    expected_scales = 4 * k if packet.encoding == pb.ENCODING_INT8 else 0
    if len(packet.scales) != expected_scales:
        raise InvalidPacket(f"scales must be {expected_scales} bytes, got {len(packet.scales)}")
    raw = _decompress(packet, raw_size)
    values = np.frombuffer(raw, dtype=_DTYPES[packet.encoding]).reshape(k, d)
    if packet.encoding == pb.ENCODING_INT8:
        scales = np.frombuffer(packet.scales, dtype="<f4")
        if not np.all(np.isfinite(scales)) or np.any(scales < 0):
            raise InvalidPacket("int8 scales must be finite and non-negative")
        tokens = dequantize_int8(values, scales)
    else:
        tokens = values.astype(np.float32)
        if not np.all(np.isfinite(tokens)):
            raise InvalidPacket("token values contain NaN or inf")
    return tokens, positions


def _decompress(packet: pb.TokenPacket, raw_size: int) -> bytes:
    if packet.compression == pb.COMPRESSION_NONE:
        if len(packet.payload) != raw_size:
            raise InvalidPacket(f"payload is {len(packet.payload)} bytes, expected {raw_size}")
        return packet.payload
    try:
        declared = zstandard.frame_content_size(packet.payload)
    except zstandard.ZstdError as exc:
        raise InvalidPacket(f"payload is not a zstd frame: {exc}") from exc
    if declared not in (-1, raw_size):
        raise InvalidPacket(f"zstd frame declares {declared} bytes, expected {raw_size}")
    try:
        raw = zstandard.ZstdDecompressor().decompress(packet.payload, max_output_size=raw_size)
    except zstandard.ZstdError as exc:
        raise InvalidPacket(f"zstd payload does not decompress: {exc}") from exc
    if len(raw) != raw_size:
        raise InvalidPacket(f"payload decompressed to {len(raw)} bytes, expected {raw_size}")
    return raw
