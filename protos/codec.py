"""Token codec: float32 tokens <-> ``TokenPacket``.

Encodings: fp32, fp16, int8 and int4 (packed two per byte), the integer ones symmetric with one
scale per token or per group of values, scales stored as float32 or float16. Compression: none,
zstd, zstd with a dictionary trained at export time, or "auto" (zstd only where it makes the
packet smaller).

Pure numpy. Every decode validates before it allocates: the declared sizes must agree with each
other and with the caller's limits before any buffer is decompressed or converted, and zstd output
is capped at the size the header fields imply (no decompression bombs). The decoded tokens are
checked before anything computes on them: finite and within ``PacketLimits.max_abs_value`` (finite
but huge int8/int4 scales overflow a server half's float32 arithmetic). Every failure raises
:class:`~splitinfer.protos.errors.InvalidPacket` with the reason.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np
import zstandard

from . import splitinfer_pb2 as pb
from .errors import InvalidPacket

__all__ = ["CodecConfig", "PacketLimits", "TokenEncoder", "UnpackedPacket", "unpack_packet", "decode_batch", "DEFAULT_MAX_ABS_VALUE", "load_dictionary", "ENCODINGS", "COMPRESSIONS",
           "SCALE_DTYPES", "encode_tokens",
           "decode_tokens", "quantize", "dequantize", "quantize_int8", "dequantize_int8", "pack_int4",
           "unpack_int4", "raw_payload_bytes"]

ENCODINGS = {"fp32": pb.ENCODING_FP32, "fp16": pb.ENCODING_FP16, "int8": pb.ENCODING_INT8, "int4": pb.ENCODING_INT4}
COMPRESSIONS = {"none": pb.COMPRESSION_NONE, "zstd": pb.COMPRESSION_ZSTD, "auto": None}
SCALE_DTYPES = {"fp32": pb.ENCODING_FP32, "fp16": pb.ENCODING_FP16}
_BITS = {pb.ENCODING_FP32: 32, pb.ENCODING_FP16: 16, pb.ENCODING_INT8: 8, pb.ENCODING_INT4: 4}
_DTYPES = {pb.ENCODING_FP32: np.dtype("<f4"), pb.ENCODING_FP16: np.dtype("<f2"), pb.ENCODING_INT8: np.dtype("i1")}
QMAX = {8: 127.0, 4: 7.0}
DEFAULT_MAX_ABS_VALUE = 1e6
INT8_MAX = QMAX[8]
_FP16_MIN_NORMAL = 2.0 ** -14
_FP32_MIN_NORMAL = float(np.finfo(np.float32).tiny)

# zstd (de)compressors are not thread-safe and cost tens of microseconds to make (more with a
# dictionary): keep one per thread, per level and dictionary.
_local = threading.local()


def _cached(kind: str, level: int, dictionary) -> "zstandard.ZstdCompressor | zstandard.ZstdDecompressor":
    cache = _local.__dict__.setdefault("cache", {})
    key = (kind, level, id(dictionary))
    entry = cache.get(key)
    if entry is None or entry[1] is not dictionary:
        if kind == "c":
            # no dictionary id in the frame (4 bytes): the packet says it uses the model's dictionary,
            # and the deployment hash already ties edge and server to the same one
            obj = zstandard.ZstdCompressor(level=level, dict_data=dictionary, write_content_size=True,
                                           write_dict_id=False)
        else:
            obj = zstandard.ZstdDecompressor(dict_data=dictionary)
        entry = cache[key] = (obj, dictionary)
    return entry[0]


def load_dictionary(data: "bytes | zstandard.ZstdCompressionDict | None") -> "zstandard.ZstdCompressionDict | None":
    """Raw dictionary bytes (a model folder's zstd.dict) -> a reusable ZstdCompressionDict."""
    if data is None or isinstance(data, zstandard.ZstdCompressionDict):
        return data
    return zstandard.ZstdCompressionDict(data)


@dataclass(frozen=True)
class CodecConfig:
    """How the edge encodes tokens.

    encoding: fp32 | fp16 | int8 | int4. compression: none | zstd | auto (zstd, kept only when it
    makes the payload smaller; with a dictionary when one is given to ``encode_tokens``).
    group_size: for int8/int4, values per scale along the token dimension (0 = one per token).
    scale_dtype: fp32 | fp16, how int8/int4 scales are stored.
    """

    encoding: str = "int8"
    compression: str = "zstd"
    zstd_level: int = 1  # token payloads are a few hundred bytes: higher levels cost time, not bytes
    group_size: int = 0
    scale_dtype: str = "fp32"

    def __post_init__(self) -> None:
        if self.encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {sorted(ENCODINGS)}, got {self.encoding!r}")
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {sorted(COMPRESSIONS)}, got {self.compression!r}")
        if not 1 <= self.zstd_level <= 22:
            raise ValueError(f"zstd_level must be in [1, 22], got {self.zstd_level}")
        if self.group_size < 0:
            raise ValueError(f"group_size must be >= 0, got {self.group_size}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {sorted(SCALE_DTYPES)}, got {self.scale_dtype!r}")

    @property
    def bits(self) -> int:
        return _BITS[ENCODINGS[self.encoding]]


@dataclass(frozen=True)
class PacketLimits:
    """What a receiver accepts. ``max_position`` is the full sequence length (1 + patches)."""

    dim: int
    max_position: int
    max_tokens: int | None = None  # default: max_position
    require_cls: bool = True  # position 0 (CLS) must be present
    max_decompressed_bytes: int = 16 * 1024 * 1024
    zstd_dictionary: "bytes | zstandard.ZstdCompressionDict | None" = None  # for COMPRESSION_ZSTD_DICT
    # largest |token value| accepted after decoding: a transformer's activations stay far below it,
    # and values beyond it (sums of their squares in LayerNorm) overflow float32 in the server half
    max_abs_value: float = DEFAULT_MAX_ABS_VALUE

    def __post_init__(self) -> None:
        if self.dim < 1 or self.max_position < 1:
            raise ValueError(f"dim and max_position must be >= 1, got {self.dim}, {self.max_position}")
        if self.max_tokens is not None and not 1 <= self.max_tokens <= self.max_position:
            raise ValueError(f"max_tokens must be in [1, max_position={self.max_position}], got {self.max_tokens}")
        if self.max_decompressed_bytes < 1:
            raise ValueError(f"max_decompressed_bytes must be >= 1, got {self.max_decompressed_bytes}")
        if not 0 < self.max_abs_value < np.finfo(np.float32).max:
            raise ValueError(f"max_abs_value must be in (0, float32 max), got {self.max_abs_value}")
        object.__setattr__(self, "zstd_dictionary", load_dictionary(self.zstd_dictionary))

    @classmethod
    def for_manifest(cls, manifest, **overrides) -> "PacketLimits":
        """What a model accepts: its wire dim, its sequence length, its zstd dictionary if it ships one."""
        return cls(dim=manifest.dim, max_position=manifest.num_tokens,
                   zstd_dictionary=manifest.zstd_dictionary, **overrides)


def _groups(dim: int, group_size: int) -> int:
    if group_size == 0:
        return 1
    if dim % group_size:
        raise ValueError(f"group_size {group_size} does not divide the token dimension {dim}")
    return dim // group_size


def _quantize_per_token(tokens: np.ndarray, qmax: np.float32, scale_dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """float32 (K, d) -> (q int8 (K, d), scales as stored: (K,) float16 or float32).

    One scale per token: the edge's hot path, in as few numpy calls as it takes (each costs about a
    microsecond on a small device, more with cold caches right after the device half ran): the
    checks read the K scales as a Python list, and rounding writes int8 directly.
    """
    scale = np.abs(tokens).max(axis=1)
    scale /= qmax
    values = scale.tolist()
    if not math.isfinite(sum(values)):  # NaN or inf anywhere in the tokens
        raise ValueError("tokens contain NaN or inf")
    stored = scale
    if scale_dtype == "fp16":
        if max(values) > 65504.0:
            raise ValueError("token values too large for float16 scales; use scale_dtype='fp32'")
        stored = scale.astype(np.float16)
        scale = stored.astype(np.float32)  # a float16 operand would make the division below slower
    # A scale below its storage type's smallest normal number is zero (an all-zero token, or one
    # below float16's range: it gets scale 1 and q = 0) or lost precision, so that x / scale can
    # land outside [-qmax, qmax]: only then the slow path. Otherwise |x / scale| <= qmax up to
    # float rounding, which rint absorbs.
    if min(values) >= (_FP16_MIN_NORMAL if scale_dtype == "fp16" else _FP32_MIN_NORMAL):
        q = np.empty(tokens.shape, dtype=np.int8)
        np.rint(tokens / scale[:, None], out=q, casting="unsafe")
        return q, stored
    if not scale.all():
        scale[scale == 0] = np.float32(1.0)
        stored = scale.astype(stored.dtype)
    q = tokens / scale[:, None]
    np.rint(q, out=q)
    np.clip(q, -qmax, qmax, out=q)
    return q.astype(np.int8), stored


def quantize(tokens: np.ndarray, bits: int = 8, group_size: int = 0, scale_dtype: str = "fp32") -> tuple[np.ndarray, np.ndarray]:
    """Symmetric quantization. tokens float32 (K, d) -> (q int8 (K, d) in [-qmax, qmax], scales (K, G)).

    qmax is 127 (8 bits) or 7 (4 bits); G = d / group_size groups (1 when group_size is 0);
    scale = max|x| / qmax per group, rounded to ``scale_dtype`` (float32 or float16) and stored as
    float32; a group whose scale is 0 (all zero, or underflowing float16) gets scale 1 and q = 0.
    q = round-half-even(x / scale), clipped. ``splitinfer.export.tokens.fake_quantize`` mirrors it.
    """
    tokens = np.asarray(tokens, dtype=np.float32)
    k, d = tokens.shape
    g = _groups(d, group_size)
    qmax = np.float32(QMAX[bits])
    if g == 1:
        q, scale = _quantize_per_token(tokens, qmax, scale_dtype)
        return q, scale.astype(np.float32)[:, None]
    grouped = tokens.reshape(k, g, d // g)
    scale = np.abs(grouped).max(axis=-1) / qmax  # (K, G)
    if scale_dtype == "fp16":
        with np.errstate(over="ignore"):
            scale = scale.astype(np.float16)
        if not np.all(np.isfinite(scale)):
            raise ValueError("token values too large for float16 scales; use scale_dtype='fp32'")
        scale = scale.astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    q = np.clip(np.rint(grouped / scale[:, :, None]), -qmax, qmax).astype(np.int8)
    return q.reshape(k, d), scale


def dequantize(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """q int8 (K, d), scales float32 (K, G) -> float32 (K, d); a product beyond float32 is inf (no warning)."""
    k, d = q.shape
    g = scales.shape[1]
    with np.errstate(over="ignore"):
        return (q.reshape(k, g, d // g).astype(np.float32) * scales.astype(np.float32)[:, :, None]).reshape(k, d)


def quantize_int8(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """tokens float32 (K, d) -> (int8 (K, d), float32 scales (K,)); one float32 scale per token."""
    q, scale = quantize(tokens, 8)
    return q, scale[:, 0]


def dequantize_int8(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """int8 (K, d), float32 (K,) -> float32 (K, d)."""
    return dequantize(q, np.asarray(scales, dtype=np.float32)[:, None])


def _int4_pair_table() -> np.ndarray:
    """uint8 (65536,): a little-endian pair of int8 values in [-8, 7] (read as one uint16) -> its
    packed byte, the first value's two's complement nibble low."""
    pair = np.arange(65536, dtype=np.uint32)
    return ((pair & 0x0F) | ((pair >> 8) & 0x0F) << 4).astype(np.uint8)


_INT4_PAIRS = _int4_pair_table()  # 64 KB


def pack_int4(q: np.ndarray) -> bytes:
    """int8 values in [-8, 7], even count -> bytes, two's complement nibbles, low nibble first."""
    # The edge's hot path: one table lookup per pair of values (the pair read as a little-endian
    # uint16) instead of a mask, a shift and an or over strided halves. Rows of even length pair up
    # within the row, so a contiguous (K, d) array needs no flattening first.
    if q.dtype != np.int8:
        q = q.astype(np.int8)
    if q.ndim != 2 or q.shape[1] % 2 or not q.flags.c_contiguous:
        q = np.ascontiguousarray(q).reshape(-1)
        if q.size % 2:
            raise ValueError(f"int4 packing needs an even count of values, got {q.size}")
    return _INT4_PAIRS.take(q.view("<u2")).tobytes()


def unpack_int4(raw: bytes, count: int) -> np.ndarray:
    """Inverse of :func:`pack_int4`: -> int8 (count,)."""
    b = np.frombuffer(raw, dtype=np.uint8)
    nibbles = np.empty(2 * b.size, dtype=np.uint8)
    nibbles[0::2], nibbles[1::2] = b & 0x0F, b >> 4
    return ((nibbles[:count].astype(np.int16) ^ 8) - 8).astype(np.int8)


def raw_payload_bytes(encoding: int, num_tokens: int, dim: int) -> int:
    """Payload size before compression for a known encoding enum value."""
    return (num_tokens * dim * _BITS[encoding] + 7) // 8


class TokenEncoder:
    """Encodes tokens with one :class:`CodecConfig`, its choices made once: what an edge that
    offloads calls per request. :func:`encode_tokens` is the one-shot form.

    Safe to share between threads (zstd compressors are per thread).
    """

    def __init__(self, config: CodecConfig = CodecConfig(),
                 zstd_dictionary: "bytes | zstandard.ZstdCompressionDict | None" = None) -> None:
        self.config = config
        self.zstd_dictionary = load_dictionary(zstd_dictionary)
        self._encoding = ENCODINGS[config.encoding]
        self._quantized = self._encoding in (pb.ENCODING_INT8, pb.ENCODING_INT4)
        self._qmax = np.float32(QMAX[config.bits]) if self._quantized else None
        self._scales_encoding = SCALE_DTYPES[config.scale_dtype]
        self._scale_np = np.dtype("<f2" if config.scale_dtype == "fp16" else "<f4")
        self._compressed_kind = pb.COMPRESSION_ZSTD if self.zstd_dictionary is None else pb.COMPRESSION_ZSTD_DICT

    def encode(self, tokens: np.ndarray, positions: np.ndarray) -> pb.TokenPacket:
        """tokens float32 (K, d), positions int (K,) strictly increasing -> TokenPacket.

        With the encoder's ``zstd_dictionary`` (the model's, from its folder), zstd compression uses
        it and the packet says COMPRESSION_ZSTD_DICT.
        """
        packet = pb.TokenPacket()
        self.encode_into(packet, tokens, positions)
        return packet

    def encode_into(self, packet: pb.TokenPacket, tokens: np.ndarray, positions: np.ndarray) -> None:
        """:meth:`encode` into an empty ``packet``, such as a new request's own ``packet`` field
        (assigning a finished TokenPacket to a request would copy it)."""
        config = self.config
        if not isinstance(tokens, np.ndarray) or tokens.dtype != np.float32:
            tokens = np.asarray(tokens, dtype=np.float32)
        if not isinstance(positions, np.ndarray):
            positions = np.asarray(positions)
        if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] == 0:
            raise ValueError(f"tokens must be a non-empty (K, d) array, got shape {tokens.shape}")
        k, d = tokens.shape
        if positions.shape != (k,):
            raise ValueError(f"positions must have shape ({k},), got {positions.shape}")
        if self._quantized:
            if self._encoding == pb.ENCODING_INT4 and d % 2:
                raise ValueError(f"int4 needs an even token dimension, got {d}")
            group_size = config.group_size if config.group_size != d else 0
            if group_size == 0:
                q, stored = _quantize_per_token(tokens, self._qmax, config.scale_dtype)
            else:
                q, stored = quantize(tokens, config.bits, group_size, config.scale_dtype)
                packet.group_size = group_size
            raw = q.tobytes() if self._encoding == pb.ENCODING_INT8 else pack_int4(q)
            packet.scales = stored.astype(self._scale_np, copy=False).tobytes()
            packet.scales_encoding = self._scales_encoding
        else:
            if not math.isfinite(float(np.abs(tokens).max())):
                raise ValueError("tokens contain NaN or inf")
            raw = tokens.astype(_DTYPES[self._encoding]).tobytes()
        payload = raw
        if config.compression != "none":
            compressed = _cached("c", config.zstd_level, self.zstd_dictionary).compress(raw)
            if config.compression == "zstd" or len(compressed) < len(raw):
                packet.compression, payload = self._compressed_kind, compressed
        packet.num_tokens, packet.dim, packet.encoding = k, d, self._encoding
        packet.positions.extend(positions.tolist())
        packet.payload, packet.uncompressed_size = payload, len(raw)


def encode_tokens(tokens: np.ndarray, positions: np.ndarray, config: CodecConfig = CodecConfig(),
                  zstd_dictionary: "zstandard.ZstdCompressionDict | None" = None) -> pb.TokenPacket:
    """tokens float32 (K, d), positions int (K,) strictly increasing -> TokenPacket (one-shot
    :class:`TokenEncoder`)."""
    return TokenEncoder(config, zstd_dictionary).encode(tokens, positions)


def decode_tokens(packet: pb.TokenPacket, limits: PacketLimits) -> tuple[np.ndarray, np.ndarray]:
    """TokenPacket -> (tokens float32 (K, d), positions int64 (K,)), or InvalidPacket."""
    unpacked = unpack_packet(packet, limits)
    (tokens,) = decode_batch([unpacked], limits)
    if isinstance(tokens, InvalidPacket):
        raise tokens
    return tokens, np.array(unpacked.positions, dtype=np.int64)


def decode_batch(packets: "list[pb.TokenPacket | UnpackedPacket]",
                 limits: PacketLimits) -> "list[np.ndarray | InvalidPacket]":
    """B packets -> per packet its tokens float32 (K_i, d) (as :func:`decode_tokens` gives them) or
    the InvalidPacket it raised; one bad packet fails only itself.

    What a server does per batch: each packet's fields are checked on their own (or were, by
    :func:`unpack_packet` when it arrived), then the batch is decompressed in one call per zstd
    dictionary, and the packets of one encoding and scale layout are converted together (one
    scale read and check, one unpack, one dequantize, one value check for all of them), which
    costs a fraction of decoding them one by one.
    """
    out: list = [None] * len(packets)
    units: list[tuple[int, UnpackedPacket]] = []
    for i, packet in enumerate(packets):
        if isinstance(packet, UnpackedPacket):
            units.append((i, packet))
            continue
        try:
            units.append((i, unpack_packet(packet, limits)))
        except InvalidPacket as exc:
            out[i] = exc
    for i, exc in _decompress_all(units, limits.zstd_dictionary):
        out[i] = exc
    layouts: dict[tuple, list[tuple[int, UnpackedPacket]]] = {}
    for i, u in units:
        if out[i] is None:
            layouts.setdefault((u.encoding, u.d, u.groups, u.scale_dtype), []).append((i, u))
    for (encoding, d, groups, scale_dtype), members in layouts.items():
        counts, starts, scales = _layout_arrays(members, groups, scale_dtype)
        if scales is not None and (not (scales >= 0).all() or not np.isfinite(scales).all()):  # NaN fails the first
            ok = np.minimum.reduceat(((scales >= 0) & np.isfinite(scales)).all(axis=1), starts).tolist()
            for (i, _), good in zip(members, ok):
                if not good:
                    out[i] = InvalidPacket("int8/int4 scales must be finite and non-negative")
            members = [member for member, good in zip(members, ok) if good]
            if not members:
                continue
            counts, starts, scales = _layout_arrays(members, groups, scale_dtype)
        with np.errstate(over="ignore", invalid="ignore"):
            tokens = _to_tokens(encoding, b"".join(u.raw for _, u in members), sum(counts), d, scales)  # (sum K, d)
            peaks = np.abs(tokens).max(axis=1)  # (sum K,), NaN where a token has one
        packet_peaks = np.maximum.reduceat(peaks, starts)  # NaN propagates
        for (i, u), start, peak in zip(members, starts.tolist(), packet_peaks.tolist()):
            rows = tokens[start:start + u.k]
            if not peak <= limits.max_abs_value:  # also NaN
                try:
                    _check_values(rows, limits.max_abs_value, scales is not None)
                except InvalidPacket as exc:
                    out[i] = exc
                    continue
            out[i] = rows
    return out


def _layout_arrays(members: "list[tuple[int, UnpackedPacket]]", groups: int, scale_dtype: np.dtype):
    """Packets of one layout -> (token counts, each packet's first row (B,), scales float32 (sum K, G)
    or None without groups)."""
    counts = [u.k for _, u in members]
    starts = np.cumsum([0] + counts[:-1])
    if not groups:
        return counts, starts, None
    scales = np.frombuffer(b"".join(u.scales for _, u in members), dtype=scale_dtype)
    return counts, starts, scales.astype(np.float32).reshape(sum(counts), groups)


class UnpackedPacket:
    """A packet whose fields are checked (:func:`unpack_packet`); its payload is decompressed and
    its values read by :func:`decode_batch`."""

    __slots__ = ("encoding", "k", "d", "compression", "payload", "raw_size", "raw", "scales", "scale_dtype",
                 "groups", "positions")

    def __init__(self, packet: pb.TokenPacket, raw_size: int, scale_dtype: np.dtype, groups: int,
                 positions: list[int]) -> None:
        self.encoding, self.k, self.d = packet.encoding, packet.num_tokens, packet.dim
        self.compression, self.payload, self.raw_size = packet.compression, packet.payload, raw_size
        self.raw: bytes | None = packet.payload if packet.compression == pb.COMPRESSION_NONE else None
        self.scales = packet.scales  # bytes: K * groups values of scale_dtype (empty without groups)
        self.scale_dtype, self.groups, self.positions = scale_dtype, groups, positions


def unpack_packet(packet: pb.TokenPacket, limits: PacketLimits) -> UnpackedPacket:
    """Every check on a packet's own fields (sizes, positions, encodings, the zstd frame's declared
    size), in plain Python: a few µs, no copy of the payload; InvalidPacket if bad. What is left,
    decompressing and checking values, :func:`decode_batch` does for a batch at once.
    """
    k, d = packet.num_tokens, packet.dim
    max_tokens = limits.max_tokens or limits.max_position
    if packet.encoding not in _BITS:
        raise InvalidPacket(f"unknown encoding {packet.encoding}")
    if packet.compression not in (pb.COMPRESSION_NONE, pb.COMPRESSION_ZSTD, pb.COMPRESSION_ZSTD_DICT):
        raise InvalidPacket(f"unknown compression {packet.compression}")
    if not 1 <= k <= max_tokens:
        raise InvalidPacket(f"num_tokens must be in [1, {max_tokens}], got {k}")
    if d != limits.dim:
        raise InvalidPacket(f"dim must be {limits.dim} for this model, got {d}")
    if len(packet.positions) != k:
        raise InvalidPacket(f"{len(packet.positions)} positions for {k} tokens")
    positions = list(packet.positions)  # a short list: plain Python checks it faster than numpy
    if any(later <= earlier for earlier, later in zip(positions, positions[1:])):
        raise InvalidPacket("positions must be strictly increasing (unique and sorted)")
    if positions[-1] >= limits.max_position:
        raise InvalidPacket(f"position {positions[-1]} out of range [0, {limits.max_position})")
    if limits.require_cls and positions[0] != 0:
        raise InvalidPacket("the CLS token (position 0) must be sent")
    quantized = packet.encoding in (pb.ENCODING_INT8, pb.ENCODING_INT4)
    if packet.encoding == pb.ENCODING_INT4 and d % 2:
        raise InvalidPacket(f"int4 needs an even dim, got {d}")
    raw_size = raw_payload_bytes(packet.encoding, k, d)
    if packet.uncompressed_size != raw_size:
        raise InvalidPacket(f"uncompressed_size {packet.uncompressed_size} != num_tokens*dim*bits/8 = {raw_size}")
    if raw_size > limits.max_decompressed_bytes:
        raise InvalidPacket(f"payload of {raw_size} bytes exceeds the limit of {limits.max_decompressed_bytes}")
    groups = 0
    if quantized:
        g = packet.group_size
        if g and (g > d or d % g):
            raise InvalidPacket(f"group_size {g} does not divide dim {d}")
        groups = d // g if g else 1
        if packet.scales_encoding not in (pb.ENCODING_UNSPECIFIED, pb.ENCODING_FP32, pb.ENCODING_FP16):
            raise InvalidPacket(f"unknown scales_encoding {packet.scales_encoding}")
    elif packet.group_size or packet.scales_encoding:
        raise InvalidPacket("group_size and scales_encoding apply to int8/int4 only")
    scale_dtype = np.dtype("<f2") if packet.scales_encoding == pb.ENCODING_FP16 else np.dtype("<f4")
    expected_scales = k * groups * scale_dtype.itemsize if quantized else 0
    if len(packet.scales) != expected_scales:
        raise InvalidPacket(f"scales must be {expected_scales} bytes, got {len(packet.scales)}")
    if packet.compression == pb.COMPRESSION_NONE:
        if len(packet.payload) != raw_size:
            raise InvalidPacket(f"payload is {len(packet.payload)} bytes, expected {raw_size}")
    else:
        if packet.compression == pb.COMPRESSION_ZSTD_DICT and limits.zstd_dictionary is None:
            raise InvalidPacket("packet uses a zstd dictionary but this model has none")
        try:
            declared = zstandard.frame_content_size(packet.payload)
        except zstandard.ZstdError as exc:
            raise InvalidPacket(f"payload is not a zstd frame: {exc}") from exc
        if declared not in (-1, raw_size):
            raise InvalidPacket(f"zstd frame declares {declared} bytes, expected {raw_size}")
    return UnpackedPacket(packet, raw_size, scale_dtype, groups, positions)


def _to_tokens(encoding: int, raw: bytes, k: int, d: int, scales: "np.ndarray | None") -> np.ndarray:
    """Checked raw payload bytes of K tokens -> float32 (K, d); scales float32 (K, G) for int8/int4."""
    if encoding == pb.ENCODING_INT8:
        return dequantize(np.frombuffer(raw, dtype=np.int8).reshape(k, d), scales)
    if encoding == pb.ENCODING_INT4:
        return dequantize(unpack_int4(raw, k * d).reshape(k, d), scales)
    return np.frombuffer(raw, dtype=_DTYPES[encoding]).reshape(k, d).astype(np.float32)


def _check_values(tokens: np.ndarray, limit: float, quantized: bool) -> None:
    """InvalidPacket unless every value of tokens float32 (K, d) is finite with |x| <= limit."""
    peak = float(np.max(np.abs(tokens)))  # NaN if any value is NaN
    if peak <= limit:
        return
    finite = bool(np.isfinite(tokens).all())
    if quantized:
        state = f"reach |x| = {peak:.3g}, above the limit of {limit:g}" if finite else "are not finite"
        raise InvalidPacket(f"scale out of range: tokens {state} after dequantization")
    if not finite:
        raise InvalidPacket("token values contain NaN or inf")
    raise InvalidPacket(f"token values out of range: |x| reaches {peak:.3g}, the limit is {limit:g}")


def _decompress_all(units: "list[tuple[int, UnpackedPacket]]", dictionary) -> "list[tuple[int, InvalidPacket]]":
    """Decompress the zstd payloads of ``units`` in place (``raw``): one call for all the frames of
    one dictionary (the GIL is released once, not once per packet), each frame into exactly its
    declared raw size; a batch with a bad frame is redone frame by frame. Returns (index, error)
    for the packets whose payload does not decompress."""
    errors = []
    for kind in (pb.COMPRESSION_ZSTD, pb.COMPRESSION_ZSTD_DICT):
        group = [(i, u) for i, u in units if u.raw is None and u.compression == kind]
        if not group:
            continue
        decompressor = _cached("d", 0, load_dictionary(dictionary) if kind == pb.COMPRESSION_ZSTD_DICT else None)
        if len(group) > 1:
            sizes = np.array([u.raw_size for _, u in group], dtype=np.uint64)
            try:
                result = decompressor.multi_decompress_to_buffer([u.payload for _, u in group],
                                                                 decompressed_sizes=sizes.tobytes())
                raws = [result[j].tobytes() for j in range(len(group))]
            except zstandard.ZstdError:
                raws = None
            if raws is not None and all(len(r) == u.raw_size for r, (_, u) in zip(raws, group)):
                for raw, (_, u) in zip(raws, group):
                    u.raw = raw
                continue
        for i, u in group:
            try:
                raw = decompressor.decompress(u.payload, max_output_size=u.raw_size)
            except zstandard.ZstdError as exc:
                errors.append((i, InvalidPacket(f"zstd payload does not decompress: {exc}")))
                continue
            if len(raw) != u.raw_size:
                errors.append((i, InvalidPacket(f"payload decompressed to {len(raw)} bytes, expected {u.raw_size}")))
                continue
            u.raw = raw
    return errors
