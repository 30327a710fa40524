"""Hostile InferRequests as bytes on the wire: raw byte mutations, protobuf-level tricks, broken packets,
long strings, wrong names; and a few valid requests whose answers are known.

:func:`expand` turns one seed into a batch of cases quickly (so tens of thousands go through the
live server in seconds); :func:`requests` is the hypothesis strategy over the same space.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from hypothesis import strategies as st

from splitinfer.protos import splitinfer_pb2 as pb

from ..protos.packet_cases import PACKET_KINDS, U32, corrupt_packet, hostile_text, valid_packet


@dataclass(frozen=True)
class Target:
    """What the fuzzed server serves: one model's name, sha256, token dim and sequence length."""

    model: str
    sha256: str
    dim: int
    max_position: int


@dataclass(frozen=True)
class Case:
    """One request to send: its bytes, how it was made, and for a valid one its parsed form."""

    data: bytes
    kind: str
    valid: pb.InferRequest | None = None

    def __repr__(self) -> str:  # failure reports stay readable
        return f"Case({self.kind!r}, {len(self.data)} bytes, {self.data[:48]!r}...)"


def valid_request(target: Target, rng: random.Random, request_id: str) -> pb.InferRequest:
    return pb.InferRequest(model=target.model, manifest_sha256=target.sha256, request_id=request_id,
                           packet=valid_packet(target.dim, target.max_position, rng))


def _long(rng: random.Random) -> str:
    return rng.choice(["m", "\u00e9", "\u4e2d", "\U0001f600", "\0"]) * rng.choice([129, 1000, 8193, 20_000])


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _raw(data: bytes, rng: random.Random, target: Target) -> tuple[bytes, str]:
    """Byte-level mutations of a valid serialized request."""
    op = rng.randrange(10)
    if op == 0:
        return rng.randbytes(rng.randint(0, 300)), "raw:random"
    b = bytearray(data)
    if op == 1:
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        return bytes(b), "raw:bitflip"
    if op == 2:
        return data[: rng.randrange(len(data))], "raw:truncate"
    if op == 3:
        i = rng.randrange(len(b) + 1)
        return bytes(b[:i]) + rng.randbytes(rng.randint(1, 32)) + bytes(b[i:]), "raw:insert"
    if op == 4:
        i = rng.randrange(len(b))
        return bytes(b[:i] + b[i + rng.randint(1, 64):]), "raw:delete"
    if op == 5:  # protobuf merges concatenated messages: repeated positions append, scalars take the last
        other = valid_request(target, rng, "merged").SerializeToString()
        return data + other, "raw:concatenated"
    if op == 6:
        for _ in range(rng.randint(1, 16)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b), "raw:overwrite"
    if op == 7:  # an unknown field of a random number and wire type
        tag = (rng.randint(5, 2**29 - 1) << 3) | rng.choice([0, 1, 2, 5])
        return data + _varint(tag) + rng.randbytes(rng.randint(0, 16)), "raw:unknown_field"
    if op == 8:  # nested start-group tags, deeper than any parser's recursion limit
        depth = rng.choice([10, 100, 1000, 10_000])
        return data + _varint((99 << 3) | 3) * depth, "raw:deep_groups"
    length = rng.choice([0, 1, 2**31, 2**32 - 1, 2**63])  # a packet field whose length lies
    return data + b"\x22" + _varint(length) + rng.randbytes(rng.randint(0, 8)), "raw:lying_length"


def _structured(request: pb.InferRequest, rng: random.Random, target: Target) -> str:
    """Field-level breaks of the request (strings, names) or of its packet; returns the kind's name."""
    op = rng.randrange(10)
    if op < 5:
        kinds = [corrupt_packet(request.packet, rng, target.dim, target.max_position) for _ in range(rng.randint(1, 3))]
        return "packet:" + "+".join(str(k) for k in kinds)
    if op == 5:
        setattr(request, rng.choice(["model", "manifest_sha256", "request_id"]), _long(rng))
        return "long_string"
    if op == 6:
        request.model = rng.choice(["", "no-such-model", target.model.upper(), target.model + "\0", "\u00e9" * 3])
        return "unknown_model"
    if op == 7:
        request.manifest_sha256 = rng.choice(["", "0" * 64, target.sha256[::-1], target.sha256 + "0", "\u00e9"])
        return "wrong_sha"
    if op == 8:
        request.ClearField("packet")
        return "no_packet"
    request.packet.num_tokens = rng.choice([target.max_position + 1, 2**20, U32])  # counts that agree, absurdly
    request.packet.uncompressed_size = request.packet.num_tokens * target.dim
    return "absurd_count"


def expand(seed: int, target: Target, size: int = 64, valid_share: float = 0.05) -> list[Case]:
    """``size`` cases from one seed: about half raw byte mutations, half structured, ``valid_share`` valid."""
    rng = random.Random(seed)
    cases = []
    for i in range(size):
        request = valid_request(target, rng, f"fuzz-{seed}-{i}")
        roll = rng.random()
        if roll < valid_share:
            cases.append(Case(request.SerializeToString(), "valid", request))
        elif roll < 0.5:
            data, kind = _raw(request.SerializeToString(), rng, target)
            cases.append(Case(data, kind))
        else:
            kind = _structured(request, rng, target)
            cases.append(Case(request.SerializeToString(), kind))
    return cases


@st.composite
def requests(draw, target: Target) -> Case:
    """A hostile request, field by field: hypothesis draws the strings, numbers and breaks."""
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    request = valid_request(target, rng, "hypothesis")
    for field in draw(st.lists(st.sampled_from(["model", "manifest_sha256", "request_id"]), max_size=2, unique=True)):
        setattr(request, field, draw(hostile_text()))
    kinds = draw(st.lists(st.integers(0, PACKET_KINDS - 1), max_size=3))
    for kind in kinds:
        corrupt_packet(request.packet, rng, target.dim, target.max_position, kind)
    packet = request.packet
    for field in draw(st.lists(st.sampled_from(["num_tokens", "dim", "group_size", "uncompressed_size"]), max_size=2,
                               unique=True)):
        setattr(packet, field, draw(st.integers(0, 2**64 - 1 if field == "uncompressed_size" else U32)))
    for field in draw(st.lists(st.sampled_from(["encoding", "compression", "scales_encoding"]), max_size=1)):
        setattr(packet, field, draw(st.integers(-(2**31), 2**31 - 1)))
    data = request.SerializeToString()
    if draw(st.integers(0, 4)) == 0:
        data, kind = _raw(data, rng, target)
        return Case(data, kind)
    return Case(data, "hypothesis")  # may be valid by chance: then its answer is checked for form only
