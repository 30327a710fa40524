"""One error hierarchy for the whole system, mapped to gRPC status codes in one place.

The server raises these and turns them into a status (code from ``status_code_for``, details
from ``status_details``, at most ``MAX_DETAILS_CHARS`` characters, so a request cannot make its
own error message grow past gRPC's metadata limit); the client turns a status back into the same
exception with ``from_rpc_error``. Nothing reaches a client as UNKNOWN.
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
    "MAX_DETAILS_CHARS",
    "status_code_for",
    "status_details",
    "bounded",
    "from_rpc_error",
    "from_status",
]

# Longest status details (and logged reason) the server sends: echoed client input (a model name,
# a request id) must not grow an error past gRPC's 8 KiB metadata limit.
MAX_DETAILS_CHARS = 200
_ELLIPSIS = " … "


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


def bounded(text: str, limit: int = MAX_DETAILS_CHARS) -> str:
    """``text`` cut to at most ``limit`` characters: its start and its end around " … " (the end of an
    error message often says what to do, so both are kept)."""
    if len(text) <= limit:
        return text
    if limit <= len(_ELLIPSIS) + 2:
        return text[:limit]
    room = limit - len(_ELLIPSIS)
    head = room * 3 // 4
    return text[:head] + _ELLIPSIS + text[len(text) - (room - head):]


def status_details(exc: BaseException) -> str:
    """The status details a server answers for ``exc``: its message for a SplitInferError (bounded),
    a fixed sentence for anything unexpected (its text may hold internals)."""
    if isinstance(exc, SplitInferError):
        return bounded(str(exc))
    return "internal server error; the server log has the details"


def from_rpc_error(err: grpc.RpcError) -> SplitInferError:
    """The exception a client raises for a failed call (UNKNOWN and others map to ServerInternalError)."""
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else str(err)
    return from_status(code, details)


_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def from_status(code: "grpc.StatusCode | int | None", details: str) -> SplitInferError:
    """The exception for a status given as a code (or its number, as InferStream's ErrorStatus sends it)."""
    if isinstance(code, int):
        code = _BY_NUMBER.get(code, grpc.StatusCode.UNKNOWN)
    cls = _BY_CODE.get(code, ServerInternalError)
    exc = cls(f"{getattr(code, 'name', code)}: {details}")
    exc.code = code if code is not None else cls.code
    return exc
