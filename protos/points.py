"""Operating points: one row of the table export measures, and its Pareto front. One home for both.

A point fixes the exit threshold, the token selection (mass, budget) and the codec (encoding,
group size) of a request; export measures what it buys (accuracy, exit rate) and costs (bytes,
device and server milliseconds) on the calibration split. The edge's budget controller picks among
the manifest's points per request.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, fields
from typing import Sequence

__all__ = ["ENCODINGS", "OperatingPoint", "pareto_front", "TIMING_FIELDS"]

ENCODINGS = ("fp32", "fp16", "int8", "int4")
TIMING_FIELDS = ("device_ms", "server_ms")  # measured at export: not part of the deployment hash


@dataclass(frozen=True)
class OperatingPoint:
    """threshold: exit threshold on the exit head's max softmax (0 always exits, > 1 never does).
    mass, budget: token selection (see :mod:`splitinfer.edge.selection`). encoding, group_size: the
    codec (group_size 0 = one scale per token). Measured on the calibration split: accuracy and
    exit_rate in [0, 1]; mean_bytes_per_request over all inputs, mean_bytes_per_offload and
    mean_tokens_per_offload over offloaded ones; device_ms and server_ms per request (median, one
    thread, on the export machine).
    """

    id: str
    threshold: float
    mass: float
    budget: int
    encoding: str
    accuracy: float
    exit_rate: float
    mean_bytes_per_request: float
    mean_bytes_per_offload: float
    group_size: int = 0
    mean_tokens_per_offload: float = 0.0
    device_ms: float = 0.0
    server_ms: float = 0.0
    accuracy_lower_bound: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"id must be a non-empty string, got {self.id!r}")
        if not self.threshold >= 0.0:
            raise ValueError(f"threshold must be >= 0, got {self.threshold}")
        if not 0.0 < self.mass <= 1.0:
            raise ValueError(f"mass must be in (0, 1], got {self.mass}")
        for name in ("budget", "group_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "budget" else 0):
                raise ValueError(f"{name} must be an integer >= {1 if name == 'budget' else 0}, got {value!r}")
        if self.encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, got {self.encoding!r}")
        for name in ("accuracy", "exit_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.accuracy_lower_bound is not None and not 0.0 <= self.accuracy_lower_bound <= self.accuracy:
            raise ValueError(f"accuracy_lower_bound must be in [0, accuracy={self.accuracy}], got "
                             f"{self.accuracy_lower_bound}")
        for name in ("mean_bytes_per_request", "mean_bytes_per_offload", "mean_tokens_per_offload",
                     "device_ms", "server_ms"):
            value = getattr(self, name)
            if not (value >= 0.0 and math.isfinite(value)):
                raise ValueError(f"{name} must be finite and >= 0, got {value}")

    @property
    def accuracy_floor(self) -> float:
        """The accuracy a constraint may count on: the lower bound when export recorded one, else the
        measured accuracy (older folders)."""
        return self.accuracy if self.accuracy_lower_bound is None else self.accuracy_lower_bound

    @property
    def offload_rate(self) -> float:
        return 1.0 - self.exit_rate

    @property
    def bytes_per_offload(self) -> float:
        if self.mean_bytes_per_offload > 0:
            return self.mean_bytes_per_offload
        return self.mean_bytes_per_request / self.offload_rate if self.offload_rate > 0 else 0.0

    def codec(self, base):
        """``base`` (a CodecConfig: the manifest's compression and scale storage) with this point's
        encoding and group size."""
        return dataclasses.replace(base, encoding=self.encoding, group_size=self.group_size)

    @classmethod
    def from_dict(cls, data: dict) -> "OperatingPoint":
        """A point from its JSON form; unknown keys are refused (ValueError)."""
        if not isinstance(data, dict):
            raise TypeError(f"an operating point is an object, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown operating point field(s) {unknown}")
        values = dict(data)
        for key in ("budget", "group_size"):
            if isinstance(values.get(key), float) and values[key].is_integer():
                values[key] = int(values[key])
        return cls(**values)

    def to_dict(self) -> dict:
        """The JSON form; a missing bound is left out, so older folders keep their deployment hash."""
        out = asdict(self)
        if out["accuracy_lower_bound"] is None:
            del out["accuracy_lower_bound"]
        return out

    def compute_json(self) -> dict:
        """The fields that decide what the point computes and what export measured of its answers."""
        return {k: v for k, v in self.to_dict().items() if k not in TIMING_FIELDS}


def pareto_front(points: Sequence, accuracy=lambda p: p.accuracy, cost=lambda p: p.mean_bytes_per_request) -> list:
    """The points no other point beats on both accuracy (higher) and cost (lower), cheapest first.
    Works on OperatingPoints and on any rows, given ``accuracy`` and ``cost`` accessors."""
    ordered = sorted(points, key=lambda p: (cost(p), -accuracy(p)))
    front: list = []
    for point in ordered:
        if not front or accuracy(point) > accuracy(front[-1]):
            front.append(point)
    return front
