from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENCODING_UNSPECIFIED: _ClassVar[Encoding]
    ENCODING_FP32: _ClassVar[Encoding]
    ENCODING_FP16: _ClassVar[Encoding]
    ENCODING_INT8: _ClassVar[Encoding]
    ENCODING_INT4: _ClassVar[Encoding]

class Compression(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMPRESSION_NONE: _ClassVar[Compression]
    COMPRESSION_ZSTD: _ClassVar[Compression]
    COMPRESSION_ZSTD_DICT: _ClassVar[Compression]

class Purpose(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PURPOSE_ANSWER: _ClassVar[Purpose]
    PURPOSE_AUDIT: _ClassVar[Purpose]
ENCODING_UNSPECIFIED: Encoding
ENCODING_FP32: Encoding
ENCODING_FP16: Encoding
ENCODING_INT8: Encoding
ENCODING_INT4: Encoding
COMPRESSION_NONE: Compression
COMPRESSION_ZSTD: Compression
COMPRESSION_ZSTD_DICT: Compression
PURPOSE_ANSWER: Purpose
PURPOSE_AUDIT: Purpose

class TokenPacket(_message.Message):
    __slots__ = ("num_tokens", "dim", "encoding", "compression", "scales", "positions", "payload", "uncompressed_size", "group_size", "scales_encoding")
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    UNCOMPRESSED_SIZE_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    SCALES_ENCODING_FIELD_NUMBER: _ClassVar[int]
    num_tokens: int
    dim: int
    encoding: Encoding
    compression: Compression
    scales: bytes
    positions: _containers.RepeatedScalarFieldContainer[int]
    payload: bytes
    uncompressed_size: int
    group_size: int
    scales_encoding: Encoding
    def __init__(self, num_tokens: _Optional[int] = ..., dim: _Optional[int] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., compression: _Optional[_Union[Compression, str]] = ..., scales: _Optional[bytes] = ..., positions: _Optional[_Iterable[int]] = ..., payload: _Optional[bytes] = ..., uncompressed_size: _Optional[int] = ..., group_size: _Optional[int] = ..., scales_encoding: _Optional[_Union[Encoding, str]] = ...) -> None: ...

class InferRequest(_message.Message):
    __slots__ = ("model", "manifest_sha256", "request_id", "packet", "purpose", "drift_alarm")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_SHA256_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PACKET_FIELD_NUMBER: _ClassVar[int]
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    DRIFT_ALARM_FIELD_NUMBER: _ClassVar[int]
    model: str
    manifest_sha256: str
    request_id: str
    packet: TokenPacket
    purpose: Purpose
    drift_alarm: bool
    def __init__(self, model: _Optional[str] = ..., manifest_sha256: _Optional[str] = ..., request_id: _Optional[str] = ..., packet: _Optional[_Union[TokenPacket, _Mapping]] = ..., purpose: _Optional[_Union[Purpose, str]] = ..., drift_alarm: _Optional[bool] = ...) -> None: ...

class ServerTimings(_message.Message):
    __slots__ = ("decode_ms", "compute_ms", "total_ms")
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    decode_ms: float
    compute_ms: float
    total_ms: float
    def __init__(self, decode_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class InferResponse(_message.Message):
    __slots__ = ("request_id", "probabilities", "label", "timings", "model_version", "embedding")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    label: int
    timings: ServerTimings
    model_version: str
    embedding: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, request_id: _Optional[str] = ..., probabilities: _Optional[_Iterable[float]] = ..., label: _Optional[int] = ..., timings: _Optional[_Union[ServerTimings, _Mapping]] = ..., model_version: _Optional[str] = ..., embedding: _Optional[_Iterable[float]] = ...) -> None: ...

class StreamRequest(_message.Message):
    __slots__ = ("request", "timeout_ms")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    request: InferRequest
    timeout_ms: int
    def __init__(self, request: _Optional[_Union[InferRequest, _Mapping]] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class ErrorStatus(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class StreamResponse(_message.Message):
    __slots__ = ("request_id", "response", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    response: InferResponse
    error: ErrorStatus
    def __init__(self, request_id: _Optional[str] = ..., response: _Optional[_Union[InferResponse, _Mapping]] = ..., error: _Optional[_Union[ErrorStatus, _Mapping]] = ...) -> None: ...
