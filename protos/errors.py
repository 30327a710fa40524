"""One error hierarchy for the whole system, mapped to gRPC status codes in one place.

The server raises these and ``abort_with`` turns them into a status; the client turns a status
back into the same exception with ``from_rpc_error``. Nothing reaches a client as UNKNOWN.
"""
from __future__ import annotations

import grpc

__all__ = [
    "SplitInferError",
    "InvalidPacket",
    "ModelNotFound",
    "ManifestMismatch",
    "Overloaded",
    "Unauthenticated",
    "DeadlineExceeded",
    "ServerUnavailable",
    "ServerInternalError",
    "ManifestError",
    "status_code_for",
    "from_rpc_error",
]


class SplitInferError(Exception):
    """Base of every error splitinfer raises on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidPacket(SplitInferError, ValueError):
    """A token packet or request is malformed: sizes disagree, unknown encoding, bad positions..."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFound(SplitInferError, LookupError):
    code = grpc.StatusCode.NOT_FOUND


class ManifestMismatch(SplitInferError):
    """The edge's manifest sha256 differs from the server's: the halves would not fit together."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Overloaded(SplitInferError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unauthenticated(SplitInferError):
    code = grpc.StatusCode.UNAUTHENTICATED


class DeadlineExceeded(SplitInferError, TimeoutError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ServerUnavailable(SplitInferError, ConnectionError):
    code = grpc.StatusCode.UNAVAILABLE


class ServerInternalError(SplitInferError):
    code = grpc.StatusCode.INTERNAL


class ManifestError(SplitInferError, ValueError):
    """A model folder or its manifest.json is missing, malformed, or does not match its files."""

    code = grpc.StatusCode.FAILED_PRECONDITION


_BY_CODE: dict[grpc.StatusCode, type[SplitInferError]] = {
    cls.code: cls
    for cls in (InvalidPacket, ModelNotFound, ManifestMismatch, Overloaded, Unauthenticated,
                DeadlineExceeded, ServerUnavailable, ServerInternalError)
}


def status_code_for(exc: BaseException) -> grpc.StatusCode:
    """The status a server answers for ``exc``; anything unexpected is INTERNAL, never UNKNOWN."""
    if isinstance(exc, SplitInferError):
        return exc.code
    return grpc.StatusCode.INTERNAL


def from_rpc_error(err: grpc.RpcError) -> SplitInferError:
    """The exception a client raises for a failed call (UNKNOWN and others map to ServerInternalError)."""
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else str(err)
    cls = _BY_CODE.get(code, ServerInternalError)
    exc = cls(f"{getattr(code, 'name', code)}: {details}")
    exc.code = code if code is not None else cls.code
    return exc
