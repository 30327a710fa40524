"""The device role: run the device half in ONNX Runtime, answer locally or offload over gRPC.

Never imports torch. Names are loaded on first use, so ``import splitinfer.edge`` stays cheap on a
small device (onnxruntime and Pillow load only when the session or preprocessing is needed). The function
``preprocess`` lives in ``splitinfer.edge.preprocess`` (the package attribute of that name is the
module).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = [
    "DeviceSession", "SessionOptions", "DeviceOutputs",
    "GrpcTransport", "Transport",
    "EdgeRunner", "EdgeResult", "OffloadPolicy",
    "ImageFrontEnd", "TextFrontEnd", "TextTokenizer", "LocalTransport",
    "PreprocessSpec", "load_image",
    "select_tokens",
]

_WHERE = {
    "DeviceSession": "session", "SessionOptions": "session", "DeviceOutputs": "session",
    "GrpcTransport": "transport", "Transport": "transport",
    "EdgeRunner": "runner", "EdgeResult": "runner", "OffloadPolicy": "runner",
    "ImageFrontEnd": "frontends", "TextFrontEnd": "frontends", "TextTokenizer": "frontends", "LocalTransport": "local",
    "PreprocessSpec": "preprocess", "load_image": "preprocess",
    "select_tokens": "selection",
}

if TYPE_CHECKING:
    from .frontends import ImageFrontEnd, TextFrontEnd, TextTokenizer
    from .local import LocalTransport
    from .preprocess import PreprocessSpec, load_image
    from .runner import EdgeResult, EdgeRunner, OffloadPolicy
    from .selection import select_tokens
    from .session import DeviceOutputs, DeviceSession, SessionOptions
    from .transport import GrpcTransport, Transport


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
