"""The contract between edge and server: wire messages, token codec, manifest schema, errors."""
from . import splitinfer_pb2, splitinfer_pb2_grpc
from .codec import CodecConfig, PacketLimits, decode_tokens, encode_tokens
from .errors import (
    DeadlineExceeded,
    InvalidPacket,
    ManifestError,
    ManifestMismatch,
    ModelNotFound,
    Overloaded,
    ServerInternalError,
    ServerUnavailable,
    SplitInferError,
    Unauthenticated,
    from_rpc_error,
    status_code_for,
)
from .manifest import Manifest, load_manifest, sha256_file, write_manifest

# Message size limits, set explicitly and symmetrically on client and server (bytes).
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024

__all__ = [
    "splitinfer_pb2", "splitinfer_pb2_grpc", "CodecConfig", "PacketLimits", "decode_tokens", "encode_tokens",
    "DeadlineExceeded", "InvalidPacket", "ManifestError", "ManifestMismatch", "ModelNotFound", "Overloaded",
    "ServerInternalError", "ServerUnavailable", "SplitInferError", "Unauthenticated", "from_rpc_error",
    "status_code_for", "Manifest", "load_manifest", "sha256_file", "write_manifest", "DEFAULT_MAX_MESSAGE_BYTES",
]
